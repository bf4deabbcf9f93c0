"""Redistribution and resharded checkpoints keep the multiset of (parameters, Adam moments) rows."""

from __future__ import annotations

import pytest
import torch

from lightning_grendel.splatting.gaussians import make_parameters
from lightning_grendel.splatting.grendel.checkpoint import commit_sharded, load_sharded, write_shard
from lightning_grendel.splatting.grendel.redistribute import needs_redistribution, redistribution_plan
from lightning_grendel.splatting.param_surgery import moments_of
from tests.helpers.checkpoint_rows import adam_with_state, loaded_rows, random_shard, row_multiset
from tests.helpers.distributed import run_distributed


def test_plan_moves_fewest_rows_and_evens_counts():
    counts = [10, 2, 0, 5]
    plan = redistribution_plan(counts)
    after = [counts[r] - sum(plan[r]) + sum(plan[s][r] for s in range(4)) for r in range(4)]
    assert sorted(after) == [4, 4, 4, 5]
    assert sum(map(sum, plan)) == 6  # rank 0 gives 6 (10 -> 4 or 5); nobody else sends
    assert needs_redistribution([110, 100], 0.05) and not needs_redistribution([110, 100], 0.1)


def _redistribute_rank(rank: int, world: int, counts: list[int]):
    from lightning_grendel.splatting.grendel.redistribute import redistribute

    params = make_parameters(random_shard(counts[rank], seed=rank))
    optimizer = adam_with_state(params)
    before = row_multiset({k: v.detach() for k, v in params.items()}, moments_of(params, optimizer))
    moved = redistribute(params, optimizer, threshold=0.1)
    for group in optimizer.param_groups:  # the optimiser still points at the live parameters
        assert group["params"][0] is params[group["name"]]
    after = row_multiset({k: v.detach() for k, v in params.items()}, moments_of(params, optimizer))
    return moved, before, after


@pytest.mark.timeout(120)
def test_redistribution_preserves_rows_and_moments():
    counts = [9, 1, 2]
    results = run_distributed(_redistribute_rank, 3, counts, timeout_s=60)
    assert all(moved for moved, _, _ in results)
    assert sorted(r[2].shape[0] for r in results) == [4, 4, 4]
    before = torch.cat([r[1] for r in results])
    after = torch.cat([r[2] for r in results])
    torch.testing.assert_close(before[torch.argsort(before[:, 0])], after[torch.argsort(after[:, 0])], rtol=0, atol=0)


@pytest.mark.parametrize(("saved_world", "loaded_world"), [(2, 2), (2, 3), (3, 2), (3, 1)])
def test_resharded_checkpoint_keeps_every_gaussian_and_moment(tmp_path, saved_world, loaded_world):
    shards, digests = [], []
    tmp_path = tmp_path / "ckpt"
    for rank in range(saved_world):
        params = make_parameters(random_shard(3 + 2 * rank, seed=10 + rank))
        optimizer = adam_with_state(params)
        checkpoint = {
            "state_dict": {f"gaussians.{k}": v.detach() for k, v in params.items()},
            "optimizer_states": [optimizer.state_dict()],
            "global_step": 7,
        }
        digests.append(write_shard(checkpoint, tmp_path, rank, "save"))  # what every rank does, then rank 0 commits
        shards.append(row_multiset({k: v.detach() for k, v in params.items()}, moments_of(params, optimizer)))
    commit_sharded({"global_step": 7}, tmp_path, "save", digests)
    loaded = []
    for rank in range(loaded_world):
        checkpoint = load_sharded(tmp_path, rank, loaded_world)
        assert checkpoint["global_step"] == 7
        loaded.append(loaded_rows(checkpoint))
    expected, got = torch.cat(shards), torch.cat(loaded)
    torch.testing.assert_close(got[torch.argsort(got[:, 0])], expected[torch.argsort(expected[:, 0])], rtol=0, atol=0)
    sizes = [part.shape[0] for part in loaded]
    if saved_world == loaded_world:
        assert sizes == [3 + 2 * rank for rank in range(saved_world)]  # each rank gets its own shard back
    else:
        assert max(sizes) - min(sizes) <= 1


def test_missing_shard_is_reported_by_name(tmp_path):
    checkpoint = {"state_dict": {f"gaussians.{k}": v for k, v in random_shard(2, 0).items()}}
    digests = [write_shard(checkpoint, tmp_path / "ckpt", rank, "s") for rank in range(2)]
    commit_sharded(checkpoint, tmp_path / "ckpt", "s", digests)
    (tmp_path / "ckpt" / "shard_1.pt").unlink()
    with pytest.raises(FileNotFoundError, match="shard_1.pt"):
        load_sharded(tmp_path / "ckpt", 0, 2)
    with pytest.raises(FileNotFoundError, match="no such GrendelStrategy checkpoint"):
        load_sharded(tmp_path / "elsewhere", 0, 2)

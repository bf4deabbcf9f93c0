"""``executor="auto"`` / ``sender_mode="auto"``: the same bytes as every fixed choice, chosen once per group."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_grendel.resharding import EXECUTORS, SENDER_MODES, Mesh, make_plan, reshard
from lightning_grendel.resharding.auto import candidates, choices
from lightning_grendel.resharding.senders import Transfer, select_senders
from tests.helpers.distributed import run_distributed
from tests.helpers.pipeline_cases import expected_shard, test_tensor

PAIRS = [(Mesh([0], (1, 1)), Mesh([1, 2, 3], (1, 3)), "RR", "RR"),  # 1-to-3 replicated: every variant differs
         (Mesh([0, 1, 2, 3], (2, 2)), Mesh([6, 5, 4], (3, 1)), "S0R", "S0R"),  # misaligned tiles
         (Mesh([1, 4], (1, 2)), Mesh([0, 2, 5, 3], (2, 2)), "RS1", "S1S0")]


def _auto_against_fixed(rank: int, world: int, transport: str) -> tuple[int, str]:
    shape = (7, 9)
    full = test_tensor(shape, seed=3)
    cache = choices()
    checked = 0
    for src, dst, src_spec, dst_spec in PAIRS:
        mine = expected_shard(full, src, src_spec, rank) if rank in src.ranks else None
        before = cache.measured
        auto = reshard(mine, src, src_spec, dst, dst_spec, "auto", shape=shape, dtype=full.dtype, sender_mode="auto",
                       transport=transport)
        measured = cache.measured
        assert measured <= before + 1
        again = reshard(mine, src, src_spec, dst, dst_spec, "auto", shape=shape, dtype=full.dtype,
                        sender_mode="auto", transport=transport)
        assert cache.measured == measured, "a layout already chosen is not timed again"
        fixed = [reshard(mine, src, src_spec, dst, dst_spec, executor, shape=shape, dtype=full.dtype,
                         sender_mode=mode, transport=transport) for executor in EXECUTORS for mode in SENDER_MODES]
        if rank in dst.ranks:
            want = expected_shard(full, dst, dst_spec, rank)
            assert torch.equal(auto, want) and torch.equal(again, want)
            for out in fixed:
                assert torch.equal(auto, out)
            checked += 1
        else:
            assert auto is None and again is None
    dist.barrier()
    return checked, repr(sorted(cache.chosen.values()))


@pytest.mark.timeout(200)
@pytest.mark.parametrize("transport", ["dist", "shm"])
def test_auto_matches_every_fixed_choice_and_is_chosen_once(transport):
    """On 7 gloo ranks: auto's shard is bit-identical to the expected slice and to each of the 12 fixed
    (executor, sender mode) results; a layout is timed once, and every rank chose alike."""
    results = run_distributed(_auto_against_fixed, 7, transport, timeout_s=150)
    assert sum(checked for checked, _ in results) == sum(dst.size for _, dst, _, _ in PAIRS)
    assert len({chosen for _, chosen in results}) == 1, results


def test_auto_refused_where_no_process_group_can_time_it():
    src, dst = Mesh([0], (1, 1)), Mesh([1], (1, 1))
    with pytest.raises(ValueError, match="executor='auto' is chosen on a process group.*make_plan needs one of"):
        make_plan((4, 4), torch.float32, src, "RR", dst, "RR", "auto")
    with pytest.raises(ValueError, match="sender_mode='auto' is chosen on a process group"):
        make_plan((4, 4), torch.float32, src, "RR", dst, "RR", "broadcast", "auto")
    with pytest.raises(ValueError, match="sender_mode='auto'"):
        select_senders([Transfer(8, (0,), (1,))], "auto")
    with pytest.raises(ValueError, match="unknown resharding executor 'fastest'; choose 'auto' or one of"):
        candidates("fastest", "auto")
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        reshard(torch.zeros(4, 4), src, "RR", dst, "RR")
    assert candidates("broadcast", "auto") == [("broadcast", mode) for mode in SENDER_MODES]
    assert len(candidates("auto", "auto")) == len(EXECUTORS) * len(SENDER_MODES)

"""Grendel on 2 hosts x 2 ranks equals one process; its sharded checkpoint resumes on 1 host with 3 ranks.

The ranks start as on a cluster (``torchrun --nnodes 2`` per host); the exchange crosses the veth link.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from lightning_grendel._two_hosts import TwoHosts
from lightning_grendel.splatting.gaussians import make_parameters
from lightning_grendel.splatting.grendel.checkpoint import load_sharded, save_sharded
from lightning_grendel.splatting.param_surgery import moments_of
from tests.helpers.checkpoint_rows import adam_with_state, loaded_rows, random_shard, row_multiset
from tests.helpers.distributed import run_distributed
from tests.helpers.grendel_equivalence import assert_matches_single_process, grendel_passes

VIEWS, SSIM_WEIGHT, STEP = 2, 0.2, 3


def _grendel_rank(rank: int, world: int, checkpoint: str) -> dict:
    # The torch rasterizer: no C++ build inside the ranks' time limit (the exchange is what is tested here).
    outputs = grendel_passes(rank, world, VIEWS, SSIM_WEIGHT, "pairs", backend="torch")
    torch.manual_seed(100 + rank)
    params = make_parameters(random_shard(5 + 3 * rank, seed=20 + rank))
    optimizer = adam_with_state(params)
    state = {"state_dict": {f"gaussians.{k}": v.detach() for k, v in params.items()},
             "optimizer_states": [optimizer.state_dict()], "global_step": STEP}
    save_sharded(state, Path(checkpoint), rank, world)  # collective across both hosts
    rows = row_multiset({k: v.detach() for k, v in params.items()}, moments_of(params, optimizer))
    return {"outputs": outputs, "rows": rows, "host": socket.gethostname()}


def _resume_rank(rank: int, world: int, checkpoint: str) -> torch.Tensor:
    loaded = load_sharded(Path(checkpoint), rank, world)
    assert loaded["global_step"] == STEP
    return loaded_rows(loaded)


@pytest.mark.timeout(300)
def test_grendel_on_two_hosts_matches_one_process_and_resumes_on_one_host(two_hosts: TwoHosts, tmp_path):
    world = 4
    checkpoint = tmp_path / "across_hosts.ckpt"
    before = two_hosts.link_bytes()
    ranks = two_hosts.run("tests.two_hosts.test_grendel_two_hosts:_grendel_rank", (2, 2), timeout_s=150,
                          checkpoint=str(checkpoint))
    assert [r["host"] for r in ranks] == [two_hosts.hostnames[0]] * 2 + [two_hosts.hostnames[1]] * 2
    assert all(after > start for after, start in zip(two_hosts.link_bytes(), before, strict=True))
    assert_matches_single_process([r["outputs"] for r in ranks], VIEWS, SSIM_WEIGHT)
    resumed = run_distributed(_resume_rank, 3, str(checkpoint), timeout_s=60)  # 1 host, 3 ranks
    saved = torch.cat([r["rows"] for r in ranks])
    got = torch.cat(resumed)
    assert got.shape[0] == saved.shape[0] == sum(5 + 3 * r for r in range(world))
    torch.testing.assert_close(got[torch.argsort(got[:, 0])], saved[torch.argsort(saved[:, 0])], rtol=0, atol=0)
    assert max(len(r) for r in resumed) - min(len(r) for r in resumed) <= 1

"""Real gloo runs of ``reshard()``: every executor, bit-exact against slices of the full tensor."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_utils import run_distributed
from pipeline_cases import all_specs, expected_shard, test_tensor

from lightning_grendel.strategies.pipeline import EXECUTORS, SENDER_MODES, Mesh, reshard

# (source mesh, destination mesh) on at most 8 ranks in all.
MESH_PAIRS = [
    (Mesh([0, 1], (1, 2)), Mesh([2, 3], (1, 2))),
    (Mesh([0, 1, 2, 3], (2, 2)), Mesh([4, 5, 6, 7], (2, 2))),
    (Mesh([0, 1, 2, 3], (1, 4)), Mesh([4, 5, 6, 7], (1, 4))),
    (Mesh([7, 2], (1, 2)), Mesh([0, 1, 3, 4, 5, 6], (2, 3))),
]


def _check_pairs(rank: int, world: int, pairs, spec_pairs, executors, sender_modes, shape) -> int:
    full = test_tensor(shape, seed=1)
    checked = 0
    for src, dst in pairs:
        for src_spec, dst_spec in spec_pairs:
            for executor in executors:
                for sender_mode in sender_modes:
                    mine = expected_shard(full, src, src_spec, rank) if rank in src.ranks else None
                    out = reshard(mine, src, src_spec, dst, dst_spec, executor, shape=shape, dtype=full.dtype,
                                  sender_mode=sender_mode)
                    if rank in dst.ranks:
                        want = expected_shard(full, dst, dst_spec, rank)
                        assert torch.equal(out, want), (src.shape, dst.shape, src_spec, dst_spec, executor,
                                                        sender_mode, rank)
                        checked += 1
                    else:
                        assert out is None
    dist.barrier()
    return checked


@pytest.mark.timeout(240)
def test_every_spec_pair_every_executor_on_gloo():
    """All (src spec, dst spec) pairs of a 2-D tensor, on four mesh pairs, with each executor."""
    specs = all_specs(2, 2)
    spec_pairs = [(a, b) for a in specs for b in specs]
    results = run_distributed(_check_pairs, 8, MESH_PAIRS, spec_pairs, EXECUTORS, ("normal",), (6, 8),
                              timeout_s=180)
    assert sum(results) > 0


@pytest.mark.timeout(240)
def test_every_sender_mode_on_gloo():
    """Sender-selection modes change who sends; the bytes that arrive must not change."""
    spec_pairs = [("S0R", "S0R"), ("RR", "S1R"), ("RS01", "S10R"), ("S1R", "RR"), ("S0S1", "RS0")]
    results = run_distributed(_check_pairs, 8, MESH_PAIRS[1:3], spec_pairs, EXECUTORS, SENDER_MODES, (7, 9),
                              timeout_s=180)
    assert sum(results) > 0


def _alpa_cases(rank: int, world: int) -> None:
    """The shapes of Alpa's own tests: (4,8,16) R->S0, S0->S0, RS0->S0; (3,8,2) all-gather at dim 1."""
    src, dst = Mesh([0, 1], (1, 2)), Mesh([2, 3], (1, 2))
    for shape, src_spec, dst_spec in [((4, 8, 16), "RRR", "S1RR"), ((4, 8, 16), "S1RR", "S1RR"),
                                      ((4, 8, 16), "RS1R", "S1RR"), ((3, 8, 2), "RS1R", "RRR")]:
        full = torch.arange(torch.Size(shape).numel(), dtype=torch.int32).reshape(shape)
        for executor in EXECUTORS:
            out = reshard(full if rank in src.ranks else None, src, src_spec, dst, dst_spec, executor,
                          shape=shape, dtype=full.dtype)
            if rank in dst.ranks:
                assert torch.equal(out, expected_shard(full, dst, dst_spec, rank))


@pytest.mark.timeout(120)
def test_alpa_shapes_int32_on_gloo():
    run_distributed(_alpa_cases, 4, timeout_s=60)

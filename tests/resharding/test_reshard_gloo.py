"""Real gloo runs of ``reshard()``: every executor and sender mode, bit-exact against slices of the full tensor."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_grendel.resharding import EXECUTORS, SENDER_MODES, Mesh, reshard
from tests.helpers.distributed import run_distributed
from tests.helpers.pipeline_cases import all_specs, expected_shard, test_tensor

# (source mesh, destination mesh) on at most 8 ranks in all.
MESH_PAIRS = [
    (Mesh([0, 1], (1, 2)), Mesh([2, 3], (1, 2))),
    (Mesh([0, 1, 2, 3], (2, 2)), Mesh([4, 5, 6, 7], (2, 2))),
    (Mesh([0, 1, 2, 3], (1, 4)), Mesh([4, 5, 6, 7], (1, 4))),
    (Mesh([7, 2], (1, 2)), Mesh([0, 1, 3, 4, 5, 6], (2, 3))),
]

# The executor x sender-mode matrix: meshes of other shapes on each side, rank lists out of order, and a
# misaligned pair (7 rows: source tiles of 4 and 3, destination tiles of 3, 3 and 1; the middle one
# straddles both source tiles).
MATRIX_PAIRS = [
    (Mesh([1, 6], (1, 2)), Mesh([0, 2, 7, 4], (2, 2))),
    (Mesh([3, 0, 5, 6], (2, 2)), Mesh([1, 2, 4, 7], (1, 4))),
    (Mesh([0, 1, 2, 3], (2, 2)), Mesh([6, 5, 4], (3, 1))),
]
MATRIX_SPEC_PAIRS = [
    ("RR", "S0R"), ("RR", "RS01"), ("RR", "S1S0"),  # fully replicated -> sharded
    ("S0R", "RR"), ("S01R", "RR"), ("RS1", "RR"),  # sharded -> fully replicated
    ("S0R", "S0R"), ("S0S1", "S0S1"), ("S1R", "RS0"), ("S01R", "S0S1"), ("RS10", "S10R"), ("S0S1", "S1S0"),
]


def _check_pairs(rank: int, world: int, pairs, spec_pairs, executors, sender_modes, shape, transport) -> int:
    full = test_tensor(shape, seed=1)
    checked = 0
    for src, dst in pairs:
        for src_spec, dst_spec in spec_pairs:
            for executor in executors:
                for sender_mode in sender_modes:
                    mine = expected_shard(full, src, src_spec, rank) if rank in src.ranks else None
                    out = reshard(mine, src, src_spec, dst, dst_spec, executor, shape=shape, dtype=full.dtype,
                                  sender_mode=sender_mode, transport=transport)
                    if rank in dst.ranks:
                        want = expected_shard(full, dst, dst_spec, rank)
                        assert torch.equal(out, want), (src.shape, dst.shape, src_spec, dst_spec, executor,
                                                        sender_mode, rank)
                        checked += 1
                    else:
                        assert out is None
    dist.barrier()
    return checked


def _alpa_cases(rank: int, transport: str) -> None:
    """The shapes of Alpa's own tests: (4,8,16) R->S0, S0->S0, RS0->S0; (3,8,2) all-gather at dim 1."""
    src, dst = Mesh([0, 1], (1, 2)), Mesh([2, 3], (1, 2))
    for shape, src_spec, dst_spec in [((4, 8, 16), "RRR", "S1RR"), ((4, 8, 16), "S1RR", "S1RR"),
                                      ((4, 8, 16), "RS1R", "S1RR"), ((3, 8, 2), "RS1R", "RRR")]:
        full = torch.arange(torch.Size(shape).numel(), dtype=torch.int32).reshape(shape)
        for executor in EXECUTORS:
            out = reshard(full if rank in src.ranks else None, src, src_spec, dst, dst_spec, executor,
                          shape=shape, dtype=full.dtype, transport=transport)
            if rank in dst.ranks:
                assert torch.equal(out, expected_shard(full, dst, dst_spec, rank))


def _all_checks(rank: int, world: int, transport: str) -> int:
    """One spawn for everything: process start-up dominates on a loaded 2-core machine."""
    specs = all_specs(2, 2)
    spec_pairs = [(a, "RR") for a in specs] + [("RR", b) for b in specs[1:]]
    spec_pairs += [("S0R", "S1R"), ("S01R", "RS10"), ("S1S0", "S0S1"), ("RS0", "S10R"), ("S0S1", "S0S1")]
    checked = _check_pairs(rank, world, MESH_PAIRS, spec_pairs, EXECUTORS, ("normal",), (6, 8), transport)
    mode_pairs = [("S0R", "S0R"), ("RR", "S1R"), ("RS01", "S10R"), ("S1R", "RR"), ("S0S1", "RS0")]
    checked += _check_pairs(rank, world, MESH_PAIRS[1:2], mode_pairs, EXECUTORS, SENDER_MODES, (7, 9), transport)
    _alpa_cases(rank, transport)
    _bad_input_raises_before_communication(rank)
    return checked


def _bad_input_raises_before_communication(rank: int) -> None:
    """Every rank raises locally; the barrier after it proves no rank was left waiting in a transfer."""
    src, dst = Mesh([0, 1, 2, 3], (2, 2)), Mesh([4, 5, 6, 7], (2, 2))
    full = torch.zeros(3, 8)
    bad = [(src, "S2R", dst, "RR", "names mesh axis 2"), (src, "S01R", dst, "RR", "smaller than its 4 shards"),
           (src, "RR", Mesh([3, 4], (1, 2)), "RR", "rank 3 appears in mesh 0 and mesh 1")]
    for src_mesh, src_spec, dst_mesh, dst_spec, message in bad:
        with pytest.raises(ValueError, match=message):
            reshard(full, src_mesh, src_spec, dst_mesh, dst_spec, shape=full.shape, dtype=full.dtype)
    dist.barrier()


def _executor_mode_matrix(rank: int, world: int, transport: str) -> int:
    return _check_pairs(rank, world, MATRIX_PAIRS, MATRIX_SPEC_PAIRS, EXECUTORS, SENDER_MODES, (7, 9), transport)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["dist", "shm"])
def test_reshard_on_gloo_every_executor_times_every_sender_mode(transport):
    """Each of the 3 executors with each of the 4 sender modes, on every spec pair of MATRIX_SPEC_PAIRS,
    over (1,2)->(2,2), (2,2)->(1,4) and the misaligned (2,2)->(3,1): bit-exact on every destination rank,
    with payloads over gloo and through shared memory."""
    results = run_distributed(_executor_mode_matrix, 8, transport, timeout_s=150)
    per_combination = len(MATRIX_SPEC_PAIRS) * len(EXECUTORS) * len(SENDER_MODES)
    assert sum(results) == per_combination * sum(dst.size for _, dst in MATRIX_PAIRS)


@pytest.mark.timeout(400)
def test_reshard_on_gloo_every_executor_and_sender_mode():
    """Every spec to and from fully replicated plus sharded->sharded pairs, on four mesh pairs of up to
    8 ranks, with each executor; each sender mode on the (2,2) pair, where every tile has replicas to
    choose from; Alpa's test shapes in int32.

    Every pair of every executor and sender mode also runs in the single-process executor
    (test_pipeline_tasks.py); here real gloo collectives move the same plans' bytes (the
    shared-memory transport runs the matrix test above).
    """
    results = run_distributed(_all_checks, 8, "dist", timeout_s=180)
    assert sum(results) > 0

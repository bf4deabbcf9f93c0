"""The shared-memory transport: arena layout, reuse safety across calls, host check, fallback."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from lightning_grendel.resharding import (
    EXECUTORS,
    GroupCache,
    Mesh,
    make_plan,
    reshard,
    start_plan,
)
from lightning_grendel.resharding.plan import Broadcast, Gather, Send
from lightning_grendel.resharding.reshard import _world_state
from lightning_grendel.resharding.shm import SharedMemoryArenas, arena_kind, arena_layout
from tests.helpers.distributed import run_distributed
from tests.helpers.pipeline_cases import expected_shard, test_tensor


@pytest.mark.parametrize("executor", EXECUTORS)
def test_arena_slots_never_overlap_and_readers_are_the_receivers(executor):
    src, dst = Mesh([0, 1, 2, 3], (2, 2)), Mesh([4, 5, 6], (3, 1))
    plan = make_plan((7, 9), torch.float64, src, "RR", dst, "S0R", executor)
    layout = arena_layout(plan)
    slots: dict[int, list[tuple[int, int]]] = {}
    readers: dict[int, set[int]] = {}
    for index, op in enumerate(plan.ops):
        if isinstance(op, Send):
            writes = {op.sender: {op.receiver}}
        elif isinstance(op, Broadcast):
            writes = {op.ranks[0]: set(op.ranks[1:])}
        else:
            assert isinstance(op, Gather)
            writes = {m: set(op.ranks) - {m} for m in op.ranks}
        for writer, reads in writes.items():
            offset = layout.offsets[(index, writer)]
            assert offset % 64 == 0
            slots.setdefault((writer, arena_kind(op)), []).append((offset, offset + plan.op_bytes(op)))
            readers.setdefault(writer, set()).update(reads)
    assert set(slots) == set(layout.sizes)
    # Sources write only transfer arenas, destinations only gather arenas: a pipeline stage's two threads
    # (outbox sends, main-thread receives) never write the same arena.
    assert all((kind == "transfer") == (writer in src.ranks) for writer, kind in slots)
    for arena, spans in slots.items():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), (arena, spans)
        assert spans[-1][1] <= layout.sizes[arena]
    assert {w: set(r) for w, r in layout.readers.items()} == readers


def _writer_waits_for_a_slow_reader(rank: int, world: int) -> list[bool]:
    """Rank 0 sends twice through the same slot; rank 1 reads the first payload only after a pause.

    Without the end-of-plan acknowledgement rank 0 would overwrite the slot with the second payload
    before rank 1 copied the first one out.
    """
    arenas = SharedMemoryArenas()
    groups = GroupCache(60)
    results = []
    for executor in EXECUTORS:
        plan = make_plan((64, 32), torch.float32, Mesh([0], (1, 1)), "RR", Mesh([1], (1, 1)), "RR", executor)
        groups.ensure(plan.groups())
        first, second = torch.full((64, 32), 1.0), torch.full((64, 32), 2.0)
        if rank == 0:
            start_plan(plan, rank, first, groups, shm=arenas).wait()
            start_plan(plan, rank, second, groups, shm=arenas).wait()
        else:
            pending = start_plan(plan, rank, None, groups, shm=arenas)
            time.sleep(0.3)
            got_first = pending.wait()
            got_second = start_plan(plan, rank, None, groups, shm=arenas).wait()
            results += [torch.equal(got_first, first), torch.equal(got_second, second)]
    dist.barrier()
    arenas.close()
    return results


@pytest.mark.timeout(120)
def test_a_slot_is_not_reused_before_its_reader_is_done():
    results = run_distributed(_writer_waits_for_a_slow_reader, 2, timeout_s=60)
    assert results[1] == [True] * (2 * len(EXECUTORS))


def _growth_host_check_and_fallback(rank: int, world: int) -> bool:
    src, dst = Mesh([0, 1], (1, 2)), Mesh([2], (1, 1))
    # Growing tensors make every writer grow its arena while readers hold older, smaller mappings.
    for rows in (2, 40, 3, 400):
        full = test_tensor((rows, 8), seed=rows)
        for executor in EXECUTORS:
            mine = expected_shard(full, src, "S0R", rank) if rank in src.ranks else None
            out = reshard(mine, src, "S0R", dst, "RR", executor, shape=full.shape, dtype=full.dtype, transport="shm")
            if rank == 2:
                assert torch.equal(out, full), (rows, executor)
    # Receiving into a caller's buffer: the same storage comes back, and a wrong shape fails before sending.
    full = test_tensor((5, 8))
    mine = expected_shard(full, src, "S0R", rank) if rank in src.ranks else None
    buffer = torch.zeros(5, 8) if rank == 2 else None
    for transport in ("dist", "shm"):
        out = reshard(mine, src, "S0R", dst, "RR", shape=full.shape, dtype=full.dtype, transport=transport, out=buffer)
        assert rank != 2 or (out is buffer and torch.equal(buffer, full))
        buffer = torch.zeros(5, 8) if rank == 2 else None
    if rank == 2:  # checked before this rank issues anything, so no peer is needed
        plan = make_plan((5, 8), torch.float32, src, "S0R", dst, "RR", "broadcast")
        with pytest.raises(ValueError, match=r"rank 2: out has shape \(4, 8\)"):
            start_plan(plan, rank, None, GroupCache(), out=torch.zeros(4, 8))
    dist.barrier()
    arenas = SharedMemoryArenas()
    arena_files = [arenas.path(rank, kind) for kind in ("transfer", "gather")]
    arenas.writable("transfer", 16)
    arenas.writable("gather", 16)
    assert all(os.path.exists(f) for f in arena_files)
    arenas.close()
    assert not any(os.path.exists(f) for f in arena_files)
    # Pretend rank 1 lives on another host: "shm" refuses before any transfer starts, "auto" falls back.
    reshard_arenas = _world_state().shared_memory()
    reshard_arenas.hosts[1] += "-elsewhere"
    full = test_tensor((4, 8))
    mine = expected_shard(full, src, "S0R", rank) if rank in src.ranks else None
    with pytest.raises(ValueError, match="every rank of both meshes on one host"):
        reshard(mine, src, "S0R", dst, "RR", shape=full.shape, dtype=full.dtype, transport="shm")
    dist.barrier()
    out = reshard(mine, src, "S0R", dst, "RR", shape=full.shape, dtype=full.dtype, transport="auto")
    assert rank != 2 or torch.equal(out, full)
    with pytest.raises(ValueError, match="unknown transport"):
        reshard(None, src, "S0R", dst, "RR", shape=(4, 8), dtype=torch.float32, transport="tcp")
    dist.barrier()
    return True


@pytest.mark.timeout(120)
def test_arenas_grow_refuse_other_hosts_and_clean_up():
    assert run_distributed(_growth_host_check_and_fallback, 3, timeout_s=60) == [True] * 3

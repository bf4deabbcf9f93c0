"""Run a :class:`ReshardPlan`: over ``torch.distributed`` (gloo/NCCL), or inside one process.

The single-process executor moves the same bytes between per-rank buffers following the same
operations, so meshes larger than a test machine can spawn are still checked bit for bit.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from lightning_grendel.strategies.pipeline.mesh import box_slices, local_box
from lightning_grendel.strategies.pipeline.plan import Broadcast, Gather, ReshardPlan, Send, gather_layout
from lightning_grendel.strategies.pipeline.planner import Box, box_shape


class GroupCache:
    """One process group per distinct ordered rank list, created in the same order on every rank."""

    def __init__(self, timeout_s: float = 120.0) -> None:
        self._groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        self._timeout = datetime.timedelta(seconds=timeout_s)

    def ensure(self, rank_lists: Sequence[tuple[int, ...]]) -> None:
        """Collective over the default group: every rank must pass the same lists in the same order."""
        for ranks in rank_lists:
            if ranks not in self._groups:
                self._groups[ranks] = dist.new_group(list(ranks), timeout=self._timeout)

    def __getitem__(self, ranks: tuple[int, ...]) -> dist.ProcessGroup:
        return self._groups[ranks]


def _origin(box: Box) -> tuple[int, ...]:
    return tuple(start for start, _ in box)


def _read(local: torch.Tensor, origin: Sequence[int], box: Box, piece: tuple[int, int] | None) -> torch.Tensor:
    data = local[box_slices(box, origin)].contiguous()
    return data if piece is None else data.reshape(-1)[piece[0]:piece[1]].contiguous()


def _write(out: torch.Tensor, origin: Sequence[int], box: Box, data: torch.Tensor) -> None:
    out[box_slices(box, origin)].copy_(data.reshape(box_shape(box)))


class PendingReshard:
    """Outstanding work of a started resharding; ``wait()`` returns this rank's destination shard."""

    def __init__(self, out: torch.Tensor | None) -> None:
        self.out = out
        self._works: list[dist.Work] = []
        self._finishers: list[Callable[[], None]] = []
        self._keep: list[torch.Tensor] = []

    def drain(self) -> None:
        for work in self._works:
            work.wait()
        for finish in self._finishers:
            finish()
        self._works, self._finishers, self._keep = [], [], []

    def wait(self) -> torch.Tensor | None:
        self.drain()
        return self.out


def start_plan(plan: ReshardPlan, rank: int, local: torch.Tensor | None, groups: GroupCache,
               tag: int = 0) -> PendingReshard:
    """Issue this rank's part of ``plan``; only the last round stays in flight after return."""
    src_origin = _origin(local_box(plan.src_mesh, plan.src_spec, plan.shape, rank)) if local is not None else None
    out = None
    dst_origin: tuple[int, ...] = ()
    if rank in plan.dst_mesh.ranks:
        dst_box = local_box(plan.dst_mesh, plan.dst_spec, plan.shape, rank)
        dst_origin = _origin(dst_box)
        out = torch.empty(box_shape(dst_box), dtype=plan.dtype, device=local.device if local is not None else None)
    pending = PendingReshard(out)
    pieces: dict[tuple[int, int], torch.Tensor] = {}
    current = None
    for index, op in enumerate(plan.ops):
        if current is not None and op.round != current:
            pending.drain()
        current = op.round
        if isinstance(op, Send):
            task = plan.tasks[op.task]
            if rank == op.sender:
                payload = _read(local, src_origin, task.box, op.piece)
                pending._keep.append(payload)
                pending._works.append(dist.isend(payload, op.receiver, tag=tag + index))
            elif rank == op.receiver:
                numel = task.numel if op.piece is None else op.piece[1] - op.piece[0]
                buffer = torch.empty(numel, dtype=plan.dtype, device=out.device)
                pending._works.append(dist.irecv(buffer, op.sender, tag=tag + index))
                if op.piece is None:
                    pending._finishers.append(lambda b=buffer, x=task.box: _write(out, dst_origin, x, b))
                else:
                    pieces[(op.task, op.piece[0])] = buffer
        elif isinstance(op, Broadcast) and rank in op.ranks:
            task = plan.tasks[op.task]
            if rank == op.ranks[0]:
                buffer = _read(local, src_origin, task.box, None)
            else:
                buffer = torch.empty(box_shape(task.box), dtype=plan.dtype, device=out.device)
                pending._finishers.append(lambda b=buffer, x=task.box: _write(out, dst_origin, x, b))
            pending._keep.append(buffer)
            pending._works.append(dist.broadcast(buffer, src=op.ranks[0], group=groups[op.ranks], async_op=True))
        elif isinstance(op, Gather) and rank in op.ranks:
            _start_gather(plan, op, rank, out, dst_origin, pieces, groups, pending)
    return pending


def _start_gather(plan: ReshardPlan, op: Gather, rank: int, out: torch.Tensor, dst_origin: tuple[int, ...],
                  pieces: Mapping[tuple[int, int], torch.Tensor], groups: GroupCache,
                  pending: PendingReshard) -> None:
    layout, size = gather_layout(plan.tasks, op)
    mine = layout[op.ranks.index(rank)]
    contribution = torch.zeros(size, dtype=plan.dtype, device=out.device)
    offset = 0
    for task, start, stop in mine:
        if stop > start:
            contribution[offset:offset + stop - start] = pieces[(task, start)]
        offset += stop - start
    group = groups[op.ranks]
    gathered = [torch.empty_like(contribution) for _ in op.ranks]
    pending._keep.append(contribution)
    pending._works.append(dist.all_gather(gathered, contribution, group=group, async_op=True))
    # all_gather fills the list in group-rank order, which is ascending global rank, not the order of
    # op.ranks (a mesh may list its ranks in any order): read each receiver's piece at its group rank.
    order = [dist.get_group_rank(group, r) for r in op.ranks]
    pending._finishers.append(lambda: _assemble(plan, layout, [gathered[i] for i in order], out, dst_origin))


def _assemble(plan: ReshardPlan, layout: Sequence[Sequence[tuple[int, int, int]]],
              contributions: Sequence[torch.Tensor], out: torch.Tensor, dst_origin: Sequence[int]) -> None:
    """Put every gathered flat piece back at its place in the destination shard."""
    flats: dict[int, torch.Tensor] = {}
    for pieces, contribution in zip(layout, contributions, strict=True):
        offset = 0
        for task, start, stop in pieces:
            flat = flats.setdefault(task, torch.empty(plan.tasks[task].numel, dtype=plan.dtype, device=out.device))
            flat[start:stop] = contribution[offset:offset + stop - start]
            offset += stop - start
    for task, flat in flats.items():
        _write(out, dst_origin, plan.tasks[task].box, flat)


def simulate_plan(plan: ReshardPlan, shards: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Execute ``plan`` in one process: ``shards`` maps each source rank to its local shard."""
    src_origin = {r: _origin(local_box(plan.src_mesh, plan.src_spec, plan.shape, r)) for r in plan.src_mesh.ranks}
    dst_origin = {}
    outs = {}
    for r in plan.dst_mesh.ranks:
        box = local_box(plan.dst_mesh, plan.dst_spec, plan.shape, r)
        dst_origin[r] = _origin(box)
        outs[r] = torch.zeros(box_shape(box), dtype=plan.dtype)
    pieces: dict[int, dict[tuple[int, int], torch.Tensor]] = {r: {} for r in plan.dst_mesh.ranks}
    for op in plan.ops:
        if isinstance(op, Send):
            task = plan.tasks[op.task]
            data = _read(shards[op.sender], src_origin[op.sender], task.box, op.piece).clone()
            if op.piece is None:
                _write(outs[op.receiver], dst_origin[op.receiver], task.box, data)
            else:
                pieces[op.receiver][(op.task, op.piece[0])] = data
        elif isinstance(op, Broadcast):
            task = plan.tasks[op.task]
            data = _read(shards[op.ranks[0]], src_origin[op.ranks[0]], task.box, None).clone()
            for receiver in op.ranks[1:]:
                _write(outs[receiver], dst_origin[receiver], task.box, data)
        else:
            layout, size = gather_layout(plan.tasks, op)
            contributions = []
            for rank, mine in zip(op.ranks, layout, strict=True):
                contribution = torch.zeros(size, dtype=plan.dtype)
                offset = 0
                for task, start, stop in mine:
                    if stop > start:
                        contribution[offset:offset + stop - start] = pieces[rank][(task, start)]
                    offset += stop - start
                contributions.append(contribution)
            for rank in op.ranks:
                _assemble(plan, layout, contributions, outs[rank], dst_origin[rank])
    return outs

"""Run a :class:`ReshardPlan`: over ``torch.distributed`` (gloo/NCCL; with shared-memory arenas, the
operations inside one host go through shared memory and broadcasts across hosts follow the host
boundaries, see ``shm.py`` and ``fanout.py``), or inside one process.

The single-process executor moves the same bytes between per-rank buffers following the same
operations, so meshes larger than a test machine can spawn are still checked bit for bit.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from lightning_grendel.resharding.fanout import Fanout, fanout
from lightning_grendel.resharding.mesh import box_slices, local_box
from lightning_grendel.resharding.plan import Broadcast, Gather, ReshardPlan, Send, gather_layout
from lightning_grendel.resharding.shm import SharedMemoryArenas, arena_layout, op_ranks
from lightning_grendel.resharding.tasks import Box, box_shape


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
        self._closing: Callable[[], None] | None = None

    def drain(self) -> None:
        for work in self._works:
            work.wait()
        for finish in self._finishers:
            finish()
        self._works, self._finishers, self._keep = [], [], []

    def wait(self) -> torch.Tensor | None:
        self.drain()
        if self._closing is not None:
            self._closing()
            self._closing = None
        return self.out


def _signal() -> torch.Tensor:
    return torch.zeros(1, dtype=torch.uint8)


class _Staging:
    """Where this rank's payloads go and where received ones are read: message buffers or shared memory.

    With arenas, each operation whose ranks share one host goes through shared memory; the others go
    through torch.distributed, broadcasts across hosts as a :class:`Fanout`. Every rank decides alike.
    """

    def __init__(self, plan: ReshardPlan, rank: int, shm: SharedMemoryArenas | None) -> None:
        self.plan, self.rank, self.shm = plan, rank, shm
        self.layout = arena_layout(plan, shm.hosts) if shm is not None else None

    def local(self, op: Send | Broadcast | Gather) -> bool:
        """Whether ``op`` moves its payload through shared memory (all its ranks on one host)."""
        return self.shm is not None and self.shm.one_host(op_ranks(op))

    def fanout(self, op: Broadcast) -> Fanout | None:
        """The host-following routes of a broadcast across hosts; None without arenas or on one host."""
        return fanout(op.ranks, self.shm.hosts) if self.shm is not None else None

    def slot(self, index: int, writer: int, numel: int) -> torch.Tensor:
        """The arena slot ``writer`` uses for operation ``index`` (map it only after ``writer`` signalled)."""
        offset = self.layout.offsets[(index, writer)]
        nbytes = numel * self.plan.itemsize
        kind = self.layout.kinds[(index, writer)]
        if writer == self.rank:
            arena = self.shm.writable(kind, self.layout.sizes[(writer, kind)])
        else:
            arena = self.shm.readable(writer, kind, offset + nbytes)
        return arena[offset:offset + nbytes].view(self.plan.dtype)

    def acknowledge(self, tag: int) -> None:
        """Tell each writer this rank read from that it is done; wait until this rank's readers are.

        After this a writer may reuse its arena: the next plan's payloads cannot overwrite unread bytes.
        """
        readers = self.layout.readers
        works = [dist.isend(_signal(), writer, tag=tag) for writer in sorted(readers)
                 if writer != self.rank and self.rank in readers[writer]]
        works += [dist.irecv(_signal(), reader, tag=tag) for reader in sorted(readers.get(self.rank, ()))]
        for work in works:
            work.wait()


def _stage(slot: torch.Tensor, local: torch.Tensor, origin: Sequence[int], box: Box,
           piece: tuple[int, int] | None) -> None:
    """Copy a task's box (or its flat piece) straight into a shared-memory slot."""
    if piece is None:
        slot.view(box_shape(box)).copy_(local[box_slices(box, origin)])
    else:
        slot.copy_(_read(local, origin, box, piece))


def _covers(out: torch.Tensor, origin: Sequence[int], box: Box) -> bool:
    """Whether ``box`` is this rank's whole destination shard, so a receive can land in ``out`` itself."""
    return out.is_contiguous() and tuple(origin) == _origin(box) and box_shape(box) == tuple(out.shape)


def receive_device(local: torch.Tensor | None) -> torch.device:
    """Where this rank's destination shard lives: NCCL moves only CUDA tensors, gloo CPU ones."""
    if local is not None:
        return local.device
    if "nccl" in dist.get_backend():  # "nccl", or "cpu:gloo,cuda:nccl"
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def start_plan(plan: ReshardPlan, rank: int, local: torch.Tensor | None, groups: GroupCache,
               tag: int = 0, shm: SharedMemoryArenas | None = None,
               out: torch.Tensor | None = None) -> PendingReshard:
    """Issue this rank's part of ``plan``; only the last round stays in flight after return.

    With ``shm`` the payloads travel through the ranks' shared-memory arenas and ``torch.distributed``
    carries only one-byte signals; every rank of the plan must then be on this host. A destination
    rank may pass ``out`` (its shard's shape and dtype) to receive into a buffer it reuses: a fresh
    large tensor costs a page fault per page on first write.
    """
    staging = _Staging(plan, rank, shm)
    src_origin = _origin(local_box(plan.src_mesh, plan.src_spec, plan.shape, rank)) if local is not None else None
    dst_origin: tuple[int, ...] = ()
    if rank in plan.dst_mesh.ranks:
        dst_box = local_box(plan.dst_mesh, plan.dst_spec, plan.shape, rank)
        dst_origin = _origin(dst_box)
        if out is None:
            out = torch.empty(box_shape(dst_box), dtype=plan.dtype, device=receive_device(local))
        elif tuple(out.shape) != box_shape(dst_box) or out.dtype != plan.dtype:
            raise ValueError(f"rank {rank}: out has shape {tuple(out.shape)} and dtype {out.dtype}; its destination "
                             f"shard needs {box_shape(dst_box)} and {plan.dtype}")
    else:
        out = None
    pending = PendingReshard(out)
    pieces: dict[tuple[int, int], torch.Tensor] = {}
    current = None
    for index, op in enumerate(plan.ops):
        if current is not None and op.round != current:
            pending.drain()
        current = op.round
        if isinstance(op, Send) and rank in (op.sender, op.receiver):
            _start_send(plan, index, op, rank, local, src_origin, out, dst_origin, pieces, staging, tag, pending)
        elif isinstance(op, Broadcast) and rank in op.ranks:
            route = staging.fanout(op)
            if route is None:
                _start_broadcast(plan, index, op, rank, local, src_origin, out, dst_origin, staging, groups, pending)
            else:
                _start_fanout(plan, index, op, route, rank, local, src_origin, out, dst_origin, staging, tag, pending)
        elif isinstance(op, Gather) and rank in op.ranks:
            _start_gather(plan, index, op, rank, out, dst_origin, pieces, staging, groups, pending)
    if shm is not None:
        pending._closing = lambda: staging.acknowledge(tag + len(plan.ops))
    return pending


def transport_pairs(plan: ReshardPlan, shm: SharedMemoryArenas | None) -> set[tuple[int, int, str]]:
    """``(from rank, to rank, "shm" or "dist")`` for every payload hand-over :func:`start_plan` makes.

    The same decisions as the executor (:class:`_Staging`), for checking which transport carried which
    pair: an operation among ranks on one host uses shared memory, anything else torch.distributed; a
    broadcast across hosts crosses between host leaders, then goes through its leaders' arenas.
    """
    staging = _Staging(plan, -1, shm)
    pairs: set[tuple[int, int, str]] = set()
    for op in plan.ops:
        route = staging.fanout(op) if isinstance(op, Broadcast) else None
        if route is not None:
            pairs |= {(parent, child, "dist") for child, parent in route.parent.items()}
            pairs |= {(leader, member, "shm") for leader, members in route.local.items() for member in members}
            continue
        kind = "shm" if staging.local(op) else "dist"
        if isinstance(op, Send):
            pairs.add((op.sender, op.receiver, kind))
        elif isinstance(op, Broadcast):
            pairs |= {(op.ranks[0], r, kind) for r in op.ranks[1:]}
        else:
            pairs |= {(a, b, kind) for a in op.ranks for b in op.ranks if a != b}
    return pairs


def _start_send(plan: ReshardPlan, index: int, op: Send, rank: int, local: torch.Tensor | None,
                src_origin: tuple[int, ...] | None, out: torch.Tensor | None, dst_origin: tuple[int, ...],
                pieces: dict[tuple[int, int], torch.Tensor], staging: _Staging, tag: int,
                pending: PendingReshard) -> None:
    task = plan.tasks[op.task]
    numel = task.numel if op.piece is None else op.piece[1] - op.piece[0]
    shared = staging.local(op)
    if rank == op.sender:
        if not shared:
            payload = _read(local, src_origin, task.box, op.piece)
        else:
            _stage(staging.slot(index, rank, numel), local, src_origin, task.box, op.piece)
            payload = _signal()
        pending._keep.append(payload)
        pending._works.append(dist.isend(payload, op.receiver, tag=tag + index))
        return
    if not shared and op.piece is None and _covers(out, dst_origin, task.box):
        pending._works.append(dist.irecv(out, op.sender, tag=tag + index))  # straight into the result
        return
    if not shared:
        buffer = torch.empty(numel, dtype=plan.dtype, device=out.device)
        pending._works.append(dist.irecv(buffer, op.sender, tag=tag + index))

        def received() -> torch.Tensor:
            return buffer
    else:
        signal = _signal()
        pending._keep.append(signal)
        pending._works.append(dist.irecv(signal, op.sender, tag=tag + index))

        def received() -> torch.Tensor:
            return staging.slot(index, op.sender, numel)
    if op.piece is None:
        pending._finishers.append(lambda: _write(out, dst_origin, task.box, received()))
    else:
        pending._finishers.append(lambda: pieces.__setitem__((op.task, op.piece[0]), received()))


def _start_broadcast(plan: ReshardPlan, index: int, op: Broadcast, rank: int, local: torch.Tensor | None,
                     src_origin: tuple[int, ...] | None, out: torch.Tensor | None, dst_origin: tuple[int, ...],
                     staging: _Staging, groups: GroupCache, pending: PendingReshard) -> None:
    task = plan.tasks[op.task]
    sender = op.ranks[0]
    if not staging.local(op):
        if rank == sender:
            buffer = _read(local, src_origin, task.box, None)
        elif _covers(out, dst_origin, task.box):
            buffer = out  # straight into the result
        else:
            buffer = torch.empty(box_shape(task.box), dtype=plan.dtype, device=out.device)
            pending._finishers.append(lambda: _write(out, dst_origin, task.box, buffer))
    else:
        if rank == sender:
            _stage(staging.slot(index, rank, task.numel), local, src_origin, task.box, None)
        else:
            pending._finishers.append(
                lambda: _write(out, dst_origin, task.box, staging.slot(index, sender, task.numel)))
        buffer = _signal()
    pending._keep.append(buffer)
    pending._works.append(dist.broadcast(buffer, src=sender, group=groups[op.ranks], async_op=True))


def _start_fanout(plan: ReshardPlan, index: int, op: Broadcast, route: Fanout, rank: int, local: torch.Tensor | None,
                  src_origin: tuple[int, ...] | None, out: torch.Tensor | None, dst_origin: tuple[int, ...],
                  staging: _Staging, tag: int, pending: PendingReshard) -> None:
    """A broadcast across hosts: one copy per host over torch.distributed, then shared memory inside it."""
    task, tag = plan.tasks[op.task], tag + index
    leader = next((lead for lead, members in route.local.items() if rank in members), None)
    if leader is not None:  # read the payload from the slot of this host's leader once it says so
        signal = _signal()
        pending._keep.append(signal)
        pending._works.append(dist.irecv(signal, leader, tag=tag))
        pending._finishers.append(lambda: _write(out, dst_origin, task.box, staging.slot(index, leader, task.numel)))
        return
    shares = bool(route.local[rank])
    if rank == op.ranks[0]:
        if shares:
            data = staging.slot(index, rank, task.numel)
            _stage(data, local, src_origin, task.box, None)
        else:
            data = _read(local, src_origin, task.box, None).reshape(-1)
    else:
        data = staging.slot(index, rank, task.numel) if shares else torch.empty(task.numel, dtype=plan.dtype)
        # Blocking: the payload must be here before it moves on. It cannot deadlock, since the rank this
        # waits on reaches this operation (in the same plan order) waiting at most on earlier ones.
        dist.recv(data, route.parent[rank], tag=tag)
        pending._finishers.append(lambda: _write(out, dst_origin, task.box, data))
    pending._keep.append(data)
    pending._works += [dist.isend(data, child, tag=tag) for child in route.children[rank]]
    for member in route.local[rank]:
        signal = _signal()
        pending._keep.append(signal)
        pending._works.append(dist.isend(signal, member, tag=tag))


def _start_gather(plan: ReshardPlan, index: int, op: Gather, rank: int, out: torch.Tensor,
                  dst_origin: tuple[int, ...], pieces: Mapping[tuple[int, int], torch.Tensor],
                  staging: _Staging, groups: GroupCache, pending: PendingReshard) -> None:
    layout, size = gather_layout(plan.tasks, op)
    mine = layout[op.ranks.index(rank)]
    shared = staging.local(op)
    if not shared:
        contribution = torch.zeros(size, dtype=plan.dtype, device=out.device)
    else:
        contribution = staging.slot(index, rank, size)
    offset = 0
    for task, start, stop in mine:
        if stop > start:
            contribution[offset:offset + stop - start] = pieces[(task, start)]
        offset += stop - start
    group = groups[op.ranks]
    pending._keep.append(contribution)
    if shared:
        pending._works.append(dist.barrier(group=group, async_op=True))
        pending._finishers.append(lambda: _assemble(
            plan, layout, [staging.slot(index, member, size) for member in op.ranks], out, dst_origin))
        return
    gathered = [torch.empty_like(contribution) for _ in op.ranks]
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

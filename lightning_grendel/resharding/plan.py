"""A resharding plan: the unit tasks turned into concrete operations for one executor.

``send_recv`` sends each task's box to every receiver; ``broadcast`` runs one broadcast per task over
``[sender] + receivers``; ``allgather`` sends receiver ``j`` of a destination tile the ``j``-th flat
piece of every task of that tile, then the tile's receivers all-gather. The plan is data, so the real
executor, the single-process executor and the cost model all read the same operations.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from lightning_grendel.resharding.mesh import Mesh, ShardingSpec, chunk_bounds
from lightning_grendel.resharding.senders import FixedSenderMode, Transfer, check_sender_mode, select_senders
from lightning_grendel.resharding.tasks import UnitTask, unit_tasks

FixedExecutor = Literal["send_recv", "allgather", "broadcast"]
EXECUTORS: tuple[FixedExecutor, ...] = get_args(FixedExecutor)
Executor = Literal["auto", "send_recv", "allgather", "broadcast"]  # auto: see auto.py


@dataclass(frozen=True)
class Send:
    """Point-to-point copy of task ``task`` (or of its flat ``piece``) from ``sender`` to ``receiver``."""

    round: int
    task: int
    sender: int
    receiver: int
    piece: tuple[int, int] | None = None


@dataclass(frozen=True)
class Broadcast:
    """Broadcast of task ``task`` over ``ranks``; ``ranks[0]`` is the sender."""

    round: int
    task: int
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class Gather:
    """All-gather inside a destination tile's receivers ``ranks`` of the pieces of ``tasks``."""

    round: int
    ranks: tuple[int, ...]
    tasks: tuple[int, ...]


Op = Send | Broadcast | Gather


@dataclass(frozen=True)
class ReshardPlan:
    shape: tuple[int, ...]
    dtype: torch.dtype
    src_mesh: Mesh
    src_spec: ShardingSpec
    dst_mesh: Mesh
    dst_spec: ShardingSpec
    executor: str
    tasks: tuple[UnitTask, ...]
    ops: tuple[Op, ...]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def groups(self) -> list[tuple[int, ...]]:
        """Distinct rank lists that need a process group, in first-use order (same on every rank)."""
        seen: dict[tuple[int, ...], None] = {}
        for op in self.ops:
            if isinstance(op, Broadcast | Gather):
                seen.setdefault(op.ranks, None)
        return list(seen)

    def op_bytes(self, op: Op) -> int:
        """Payload of one operation (for a gather: one receiver's contribution)."""
        if isinstance(op, Send):
            numel = self.tasks[op.task].numel if op.piece is None else op.piece[1] - op.piece[0]
        elif isinstance(op, Broadcast):
            numel = self.tasks[op.task].numel
        else:
            numel = gather_layout(self.tasks, op)[1]
        return numel * self.itemsize


def gather_layout(tasks: Sequence[UnitTask], op: Gather) -> tuple[list[list[tuple[int, int, int]]], int]:
    """Per receiver ``j``: ``(task, piece start, piece stop)`` in buffer order, and the padded buffer size."""
    parts = len(op.ranks)
    layout = [[(t, *chunk_bounds(tasks[t].numel, parts, j)) for t in op.tasks] for j in range(parts)]
    size = max(sum(stop - start for _, start, stop in pieces) for pieces in layout)
    return layout, size


def check_executor(executor: str, allow_auto: bool = True) -> None:
    """Raise ``ValueError`` naming the choices if ``executor`` is neither ``auto`` nor one of :data:`EXECUTORS`.

    ``auto`` is chosen by timing on a process group (``auto.py``): a plan built without one
    (``allow_auto=False``) needs a fixed executor.
    """
    if executor == "auto" and not allow_auto:
        raise ValueError(f"executor='auto' is chosen on a process group (reshard(), PipelineRuntime or "
                         f"resharding.auto.resolve_plan); make_plan needs one of {EXECUTORS}")
    if executor != "auto" and executor not in EXECUTORS:
        raise ValueError(f"unknown resharding executor {executor!r}; choose 'auto' or one of {EXECUTORS}")


def make_plan(shape: Sequence[int], dtype: torch.dtype, src_mesh: Mesh, src_spec: str | ShardingSpec,
              dst_mesh: Mesh, dst_spec: str | ShardingSpec, executor: FixedExecutor = "broadcast",
              sender_mode: FixedSenderMode = "normal", *, host_of: Mapping[int, int] | None = None, seed: int = 0,
              loads: MutableMapping[int, int] | None = None) -> ReshardPlan:
    """Validate the request and build the plan; raises ``ValueError`` on bad input (no communication)."""
    check_executor(executor, allow_auto=False)
    check_sender_mode(sender_mode, allow_auto=False)
    shape = tuple(int(s) for s in shape)
    src = ShardingSpec.parse(src_spec, len(shape))
    dst = ShardingSpec.parse(dst_spec, len(shape))
    tasks = unit_tasks(shape, src_mesh, src, dst_mesh, dst)
    itemsize = torch.empty((), dtype=dtype).element_size()
    host_of = host_of if host_of is not None else default_hosts(src_mesh, dst_mesh)
    if executor == "allgather":
        ops = _allgather_ops(tasks, itemsize, sender_mode, host_of, seed, loads)
    else:
        transfers = [Transfer(t.numel * itemsize, t.senders, t.receivers) for t in tasks]
        chosen = select_senders(transfers, sender_mode, host_of=host_of, seed=seed, loads=loads)
        chosen = sorted(chosen, key=lambda a: (a.round, a.index))
        if executor == "broadcast":
            ops = [Broadcast(a.round, a.index, (a.sender, *tasks[a.index].receivers)) for a in chosen]
        else:
            ops = [Send(a.round, a.index, a.sender, r) for a in chosen for r in tasks[a.index].receivers]
    return ReshardPlan(shape, dtype, src_mesh, src, dst_mesh, dst, executor, tuple(tasks), tuple(ops))


def _allgather_ops(tasks: Sequence[UnitTask], itemsize: int, sender_mode: FixedSenderMode, host_of: Mapping[int, int],
                   seed: int, loads: MutableMapping[int, int] | None) -> list[Op]:
    pieces = []
    for index, task in enumerate(tasks):
        for j, receiver in enumerate(task.receivers):
            piece = chunk_bounds(task.numel, len(task.receivers), j)
            if piece[1] > piece[0]:
                pieces.append((index, receiver, piece))
    transfers = [Transfer((p[1] - p[0]) * itemsize, tasks[i].senders, (r,)) for i, r, p in pieces]
    chosen = sorted(select_senders(transfers, sender_mode, host_of=host_of, seed=seed, loads=loads),
                    key=lambda a: (a.round, a.index))
    ops: list[Op] = []
    for a in chosen:
        index, receiver, piece = pieces[a.index]
        whole = len(tasks[index].receivers) == 1
        ops.append(Send(a.round, index, a.sender, receiver, None if whole else piece))
    last = max((a.round for a in chosen), default=-1)
    by_tile: dict[tuple[int, ...], list[int]] = {}
    for index, task in enumerate(tasks):
        if len(task.receivers) > 1:
            by_tile.setdefault(task.receivers, []).append(index)
    ops.extend(Gather(last + 1, ranks, tuple(indices)) for ranks, indices in by_tile.items())
    return ops


def default_hosts(*meshes: Mesh) -> dict[int, int]:
    """Default topology: every row (axis-0 index) of every mesh is its own host."""
    hosts: dict[int, int] = {}
    next_host = 0
    for mesh in meshes:
        rows = mesh.shape[0]
        per_row = mesh.size // rows
        for i, rank in enumerate(mesh.ranks):
            hosts[rank] = next_host + i // per_row
        next_host += rows
    return hosts

"""``reshard()``: move a tensor from one mesh layout to another mesh layout, without Lightning.

DTensor cannot redistribute across different meshes; this is the missing piece, usable on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from lightning_grendel.resharding.auto import resolve_plan
from lightning_grendel.resharding.executors import GroupCache, start_plan
from lightning_grendel.resharding.mesh import Mesh, ShardingSpec, box_slices, local_box, local_shape
from lightning_grendel.resharding.plan import EXECUTORS, Executor, check_executor, make_plan
from lightning_grendel.resharding.senders import SENDER_MODES, SenderMode, check_sender_mode
from lightning_grendel.resharding.shm import SharedMemoryArenas, Transport, arenas_for, check_transport, create_arenas


class _WorldState:
    """Process groups and shared-memory arenas of the current default group (a new world starts afresh)."""

    def __init__(self) -> None:
        self.world = dist.group.WORLD
        self.groups = GroupCache()
        self.arenas: SharedMemoryArenas | None = None
        self.arenas_created = False

    def shared_memory(self) -> SharedMemoryArenas | None:
        """The arenas, created on first use (collective: every rank asks with the same transport)."""
        if not self.arenas_created:
            self.arenas = create_arenas()
            self.arenas_created = True
        return self.arenas


_STATE: list[_WorldState] = []


def _world_state() -> _WorldState:
    if not _STATE or _STATE[0].world is not dist.group.WORLD:
        _STATE[:] = [_WorldState()]
    return _STATE[0]


def reshard(tensor_or_shard: torch.Tensor | None, src_mesh: Mesh, src_spec: str | ShardingSpec, dst_mesh: Mesh,
            dst_spec: str | ShardingSpec, executor: Executor = "broadcast", *, shape: Sequence[int] | None = None,
            dtype: torch.dtype | None = None, sender_mode: SenderMode = "normal", seed: int = 0,
            groups: GroupCache | None = None, transport: Transport = "auto",
            out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Return this rank's shard of the tensor under ``dst_spec`` on ``dst_mesh`` (None off that mesh).

    Collective over the default process group: every rank calls it with the same layouts, ``shape``
    and ``dtype`` (source ranks may omit them by passing the full tensor). Source ranks pass either
    the full tensor or their local shard; the other ranks pass None. ``executor`` is
    ``send_recv``, ``allgather``, ``broadcast`` (default) or ``auto`` (the fastest, timed once per
    process group and layout on this transport, see ``auto.py``); ``sender_mode`` the sender
    selection (``normal`` by default, ``auto`` likewise). ``transport``:
    ``dist`` moves payloads with ``torch.distributed``; ``shm`` through shared memory (gloo, every rank
    of both meshes on one host); ``auto`` picks ``shm`` where it applies and ``dist`` elsewhere.
    A destination rank may pass ``out`` (its shard's shape and dtype) to receive into a reused buffer.
    """
    check_transport(transport)
    check_executor(executor)
    check_sender_mode(sender_mode)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("reshard() needs an initialised torch.distributed process group")
    rank = dist.get_rank()
    if shape is None or dtype is None:
        if tensor_or_shard is None:
            raise ValueError(f"rank {rank} passed no tensor, so it must pass shape= and dtype=")
        shape = tuple(tensor_or_shard.shape) if shape is None else shape
        dtype = tensor_or_shard.dtype if dtype is None else dtype
    shape = tuple(int(s) for s in shape)
    plan = make_plan(shape, dtype, src_mesh, src_spec, dst_mesh, dst_spec,  # validates the request; auto's later
                     EXECUTORS[0] if executor == "auto" else executor,
                     SENDER_MODES[0] if sender_mode == "auto" else sender_mode, seed=seed)
    world = dist.get_world_size()
    if max(*src_mesh.ranks, *dst_mesh.ranks) >= world:
        raise ValueError(f"mesh ranks must be below the world size {world}")
    local = None
    if rank in src_mesh.ranks:
        local = _local_shard(tensor_or_shard, plan.src_mesh, plan.src_spec, shape, rank)
        if local.dtype != dtype:
            raise ValueError(f"tensor dtype {local.dtype} differs from the declared dtype {dtype}")
    state = _world_state()
    arenas = state.shared_memory() if transport != "dist" else None
    shm = arenas_for(transport, arenas, (*src_mesh.ranks, *dst_mesh.ranks))
    groups = state.groups if groups is None else groups
    if "auto" in (executor, sender_mode):
        plan = resolve_plan(shape, dtype, src_mesh, src_spec, dst_mesh, dst_spec, executor, sender_mode, groups=groups,
                            shm=shm, device=None if local is None else local.device, seed=seed)
    groups.ensure(plan.groups())
    return start_plan(plan, rank, local, groups, shm=shm, out=out).wait()


def _local_shard(tensor: torch.Tensor | None, mesh: Mesh, spec: ShardingSpec, shape: tuple[int, ...],
                 rank: int) -> torch.Tensor:
    """Accept the full tensor or this rank's shard; anything else is a clear error."""
    if tensor is None:
        raise ValueError(f"rank {rank} is in the source mesh but passed no tensor")
    expected = local_shape(mesh, spec, shape, rank)
    if tuple(tensor.shape) == shape:
        return tensor[box_slices(local_box(mesh, spec, shape, rank))]
    if tuple(tensor.shape) == expected:
        return tensor
    raise ValueError(
        f"rank {rank}: tensor of shape {tuple(tensor.shape)} is neither the full tensor {shape} nor the local "
        f"shard {expected} under spec {spec} on mesh {mesh.shape}"
    )

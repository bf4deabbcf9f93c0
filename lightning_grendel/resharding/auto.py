"""``executor="auto"`` and ``sender_mode="auto"``: the fastest plan for a layout, timed on its transport.

Which executor wins depends on the transport more than on any topology model: over gloo's TCP
loopback a broadcast can be 1.2x slower than send/recv where it wins 1.5x through shared memory and
3.75x across hosts. So the cost of each candidate is measured where it will run: the plans of every
candidate (executor x sender mode; only the ``auto`` parts vary) are built, plans with the same
operations count once, and each distinct plan moves zeros of the layout three times over the
transport it will use (runs alternate; every rank takes part; a run's time is its slowest rank's).
The plan with the smallest best time wins; one max all-reduce gives every rank the same times, so all
choose alike. Choices are cached per default process group and layout: the measurement runs once.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lightning_grendel.resharding.executors import GroupCache, receive_device, start_plan
from lightning_grendel.resharding.mesh import Mesh, ShardingSpec, local_shape
from lightning_grendel.resharding.plan import EXECUTORS, Executor, ReshardPlan, check_executor, make_plan
from lightning_grendel.resharding.senders import SENDER_MODES, SenderMode, check_sender_mode
from lightning_grendel.resharding.shm import SharedMemoryArenas

TRIALS = 3


@dataclass
class _Choices:
    """Chosen ``(executor, sender mode)`` per layout key, for one default process group."""

    world: object
    chosen: dict[Hashable, tuple[str, str]] = field(default_factory=dict)
    measured: int = 0  # layouts timed (a test reads it: the choice is made once)


_CHOICES: list[_Choices] = []


def choices() -> _Choices:
    """The cache of the current default process group (a new group starts afresh)."""
    if not _CHOICES or _CHOICES[0].world is not dist.group.WORLD:
        _CHOICES[:] = [_Choices(dist.group.WORLD)]
    return _CHOICES[0]


def candidates(executor: Executor, sender_mode: SenderMode) -> list[tuple[str, str]]:
    """The fixed ``(executor, sender mode)`` pairs ``auto`` chooses among (a fixed part stays fixed)."""
    check_executor(executor)
    check_sender_mode(sender_mode)
    executors = EXECUTORS if executor == "auto" else (executor,)
    modes = SENDER_MODES if sender_mode == "auto" else (sender_mode,)
    return [(e, m) for e in executors for m in modes]


def resolve_plan(shape: tuple[int, ...], dtype: torch.dtype, src_mesh: Mesh, src_spec: str | ShardingSpec,
                 dst_mesh: Mesh, dst_spec: str | ShardingSpec, executor: Executor, sender_mode: SenderMode, *,
                 groups: GroupCache, shm: SharedMemoryArenas | None = None, device: torch.device | None = None,
                 seed: int = 0, host_of: Mapping[int, int] | None = None) -> ReshardPlan:
    """The plan to run: built directly when both choices are fixed, else the fastest candidate.

    Collective over the default group whenever something is ``auto`` and the layout is new to it
    (every rank calls it with the same arguments in the same order); ``groups`` gets the process
    groups of every candidate timed and ``shm`` is the transport the plan will use (None: dist).
    """
    pairs = candidates(executor, sender_mode)
    plans = [make_plan(shape, dtype, src_mesh, src_spec, dst_mesh, dst_spec, e, m, host_of=host_of, seed=seed)
             for e, m in pairs]
    if len(plans) == 1:
        return plans[0]
    cache = choices()
    first = plans[0]
    key = (first.shape, dtype, src_mesh, first.src_spec, dst_mesh, first.dst_spec, executor, sender_mode, seed,
           shm is not None, None if host_of is None else tuple(sorted(host_of.items())))
    if key not in cache.chosen:
        distinct: dict[tuple, int] = {}
        for index, plan in enumerate(plans):
            distinct.setdefault(plan.ops, index)
        timed = list(distinct.values())
        best = timed[0] if len(timed) == 1 else timed[_fastest([plans[i] for i in timed], groups, shm, device)]
        cache.chosen[key] = pairs[best]
        cache.measured += 1
    return plans[pairs.index(cache.chosen[key])]


def _fastest(plans: list[ReshardPlan], groups: GroupCache, shm: SharedMemoryArenas | None,
             device: torch.device | None) -> int:
    """Index of the plan with the smallest best time over :data:`TRIALS` alternating runs (collective)."""
    rank = dist.get_rank()
    device = device or receive_device(None)
    for plan in plans:
        groups.ensure(plan.groups())
    seconds = torch.zeros(TRIALS, len(plans), dtype=torch.float64)
    for trial in range(TRIALS):
        order = range(len(plans)) if trial % 2 == 0 else reversed(range(len(plans)))
        for index in order:
            plan = plans[index]
            local = None
            if rank in plan.src_mesh.ranks:
                shard = local_shape(plan.src_mesh, plan.src_spec, plan.shape, rank)
                local = torch.zeros(shard, dtype=plan.dtype, device=device)
            dist.barrier()
            start = time.perf_counter()
            start_plan(plan, rank, local, groups, shm=shm).wait()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[trial, index] = time.perf_counter() - start
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return int(seconds.min(dim=0).values.argmin())

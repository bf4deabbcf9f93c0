"""Gaussian redistribution between ranks, moving each Gaussian's Adam moments with it.

Densification grows shards unevenly; when the largest shard exceeds the smallest by more than a
threshold, surplus ranks send their last rows to deficit ranks until every shard holds its even share.
Unlike Grendel's random destinations this moves the fewest rows; the plan is a pure function of the
counts, so every rank derives the same one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_grendel.splatting.grendel.exchange import exchange_rows
from lightning_grendel.splatting.param_surgery import MOMENT_KEYS, append_rows, moments_of, select_rows


def even_shares(total: int, world_size: int) -> list[int]:
    """Shard sizes that differ by at most one, larger ones first."""
    return [total // world_size + (1 if rank < total % world_size else 0) for rank in range(world_size)]


def needs_redistribution(counts: list[int], threshold: float) -> bool:
    """True when the largest shard exceeds the smallest by more than ``threshold`` (a fraction)."""
    largest, smallest = max(counts), min(counts)
    return largest > (1.0 + threshold) * smallest and largest - smallest > 1


def redistribution_plan(counts: list[int]) -> list[list[int]]:
    """Send matrix ``plan[src][dst]`` (rows) that evens out ``counts`` with the fewest rows moved."""
    world_size = len(counts)
    targets = even_shares(sum(counts), world_size)
    surplus = [max(0, c - t) for c, t in zip(counts, targets, strict=True)]
    deficit = [max(0, t - c) for c, t in zip(counts, targets, strict=True)]
    plan = [[0] * world_size for _ in range(world_size)]
    dst = 0
    for src in range(world_size):
        while surplus[src] > 0:
            while deficit[dst] == 0:
                dst += 1
            moved = min(surplus[src], deficit[dst])
            plan[src][dst] += moved
            surplus[src] -= moved
            deficit[dst] -= moved
    return plan


def _pack(params: nn.ParameterDict, moments: dict[str, dict[str, Tensor]], rows: slice) -> Tensor:
    columns = []
    for key, param in params.items():
        selected = [param.detach()[rows]] + [moments[key][name][rows] for name in MOMENT_KEYS]
        columns += [t.reshape(t.shape[0], param.shape[1:].numel()) for t in selected]
    return torch.cat(columns, dim=1)


def _unpack(params: nn.ParameterDict, packed: Tensor) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    rows: dict[str, Tensor] = {}
    moments: dict[str, dict[str, Tensor]] = {}
    offset = 0
    for key, param in params.items():
        shape = param.shape[1:]
        width = shape.numel()
        pieces = []
        for _ in range(1 + len(MOMENT_KEYS)):
            pieces.append(packed[:, offset : offset + width].reshape(-1, *shape))
            offset += width
        rows[key] = pieces[0]
        moments[key] = dict(zip(MOMENT_KEYS, pieces[1:], strict=True))
    return rows, moments


def redistribute(
    params: nn.ParameterDict, optimizer: torch.optim.Optimizer | None, threshold: float, group: Any = None
) -> bool:
    """Even out shard sizes across ranks when they drift apart by more than ``threshold``; True if moved."""
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    local = torch.tensor([params["means"].shape[0]], dtype=torch.int64)
    gathered = [torch.zeros_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local, group=group)
    counts = [int(c) for c in gathered]
    if not needs_redistribution(counts, threshold):
        return False
    plan = redistribution_plan(counts)
    send = plan[rank]
    keep = counts[rank] - sum(send)
    moments = moments_of(params, optimizer)
    outgoing = _pack(params, moments, slice(keep, counts[rank]))
    received = exchange_rows(outgoing, send, [plan[src][rank] for src in range(world_size)], group)
    select_rows(params, optimizer, torch.arange(keep, device=params["means"].device))
    new_rows, new_moments = _unpack(params, received)
    append_rows(params, optimizer, new_rows, new_moments)
    return True

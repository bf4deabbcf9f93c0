"""Pixel partitions of a batch of views (Grendel's Algorithm 1), as pure functions.

The B images of a batch are stacked into B·T rows of 16-pixel tiles; rank k gets the contiguous
range whose cumulative cost crosses k·Σ/W. Every rank computes the same cut from the same costs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lightning_grendel.splatting.tiles import TILE_SIZE


class RowTask(NamedTuple):
    """Tile rows [tile_row_start, tile_row_end) of batch view ``view`` assigned to one rank."""

    view: int
    tile_row_start: int
    tile_row_end: int


def partition_rows(row_costs: Tensor, world_size: int, allow_empty: bool = False) -> Tensor:
    """Cut points [W + 1] splitting rows into W contiguous non-empty parts of near-equal cost.

    Each part's cost is within one row's cost of ``sum / W``; every row belongs to exactly one part.
    With ``allow_empty`` (evaluation renders), fewer rows than ranks leave the last ranks idle.
    """
    rows = row_costs.numel()
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if rows < world_size and allow_empty:
        return torch.tensor([min(k, rows) for k in range(world_size + 1)], dtype=torch.int64)
    if rows < world_size:
        raise ValueError(
            f"cannot split {rows} tile rows over {world_size} ranks: use more views per step or fewer ranks"
        )
    costs = row_costs.detach().to(torch.float64).flatten().clamp_min(0)
    cumulative = torch.cumsum(costs, 0)
    targets = cumulative[-1] * torch.arange(1, world_size, dtype=torch.float64) / world_size
    cuts = torch.searchsorted(cumulative, targets, right=True).tolist()
    bounded = [0]
    for k, cut in enumerate(cuts, start=1):
        bounded.append(min(max(cut, bounded[-1] + 1), rows - (world_size - k)))
    bounded.append(rows)
    return torch.tensor(bounded, dtype=torch.int64)


def tasks_of_rank(cuts: Tensor, rank: int, tiles_y: int) -> list[RowTask]:
    """The (view, tile-row range) pieces of rank ``rank``'s part of the stacked rows."""
    start, end = int(cuts[rank]), int(cuts[rank + 1])
    tasks = []
    view = start // tiles_y
    while start < end:
        view_end = (view + 1) * tiles_y
        stop = min(end, view_end)
        tasks.append(RowTask(view, start - view * tiles_y, stop - view * tiles_y))
        start, view = stop, view + 1
    return tasks


def all_tasks(cuts: Tensor, tiles_y: int) -> list[list[RowTask]]:
    """Tasks of every rank, indexed by rank."""
    return [tasks_of_rank(cuts, rank, tiles_y) for rank in range(cuts.numel() - 1)]


def own_pixel_rows(task: RowTask, height: int) -> tuple[int, int]:
    """Pixel rows [start, end) a task renders and takes the loss over."""
    return task.tile_row_start * TILE_SIZE, min(height, task.tile_row_end * TILE_SIZE)


class HaloTransfer(NamedTuple):
    """Rendered pixel rows [row_start, row_end) of batch view ``view`` that rank ``source`` sends to ``target``."""

    source: int
    target: int
    view: int
    row_start: int
    row_end: int


def halo_transfers(tasks: list[list[RowTask]], height: int, halo: int) -> list[HaloTransfer]:
    """Every rank's SSIM halo (``halo`` pixel rows above and below its own rows, clipped to the image), as
    pieces of the neighbouring ranks' renders, sorted by (source, target, view, row).

    Rendering the halo rows locally would need every Gaussian that touches them; shipping the rendered
    rows costs ``halo`` rows of pixels per cut instead. The order is the order of the exchange's buffers.
    """
    if halo <= 0:
        return []
    owners = [(rank, task) for rank, rank_tasks in enumerate(tasks) for task in rank_tasks]
    transfers = []
    for target, task in owners:
        start, end = own_pixel_rows(task, height)
        wanted = [(max(0, start - halo), start), (end, min(height, end + halo))]
        for source, other in owners:
            if other.view != task.view or source == target:
                continue
            other_start, other_end = own_pixel_rows(other, height)
            for low, high in wanted:
                if max(low, other_start) < min(high, other_end):
                    transfers.append(
                        HaloTransfer(source, target, task.view, max(low, other_start), min(high, other_end))
                    )
    return sorted(transfers)


def part_costs(row_costs: Tensor, cuts: Tensor) -> Tensor:
    """Total cost of each part [W]."""
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(row_costs.to(torch.float64), 0)])
    return cumulative[cuts[1:]] - cumulative[cuts[:-1]]

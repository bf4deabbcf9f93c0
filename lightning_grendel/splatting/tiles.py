"""16x16 tile binning: which tiles each splat touches, and the depth-sorted list of splats per tile.

Every backend and the Grendel exchange use :func:`tile_bounds`, so they agree on which Gaussians a
pixel range needs, bit for bit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

TILE_SIZE = 16


def tile_grid(width: int, height: int, tile_size: int = TILE_SIZE) -> tuple[int, int]:
    """Number of tile columns and rows covering the image."""
    return (width + tile_size - 1) // tile_size, (height + tile_size - 1) // tile_size


class TileBounds(NamedTuple):
    """Half-open tile rectangle [x_min, x_max) x [y_min, y_max) per splat, clamped to the grid."""

    x_min: Tensor
    x_max: Tensor
    y_min: Tensor
    y_max: Tensor


def tile_bounds(means2d: Tensor, radii: Tensor, width: int, height: int, tile_size: int = TILE_SIZE) -> TileBounds:
    """Tiles met by each splat's box ``mean ± radius`` (float32 arithmetic, as the C++ backend does)."""
    tiles_x, tiles_y = tile_grid(width, height, tile_size)
    mean = means2d.detach().to(torch.float32)
    radius = radii.to(torch.float32)
    x_min = torch.floor((mean[..., 0] - radius) / tile_size).clamp(0, tiles_x).to(torch.int64)
    x_max = torch.ceil((mean[..., 0] + radius) / tile_size).clamp(0, tiles_x).to(torch.int64)
    y_min = torch.floor((mean[..., 1] - radius) / tile_size).clamp(0, tiles_y).to(torch.int64)
    y_max = torch.ceil((mean[..., 1] + radius) / tile_size).clamp(0, tiles_y).to(torch.int64)
    empty = radii <= 0
    x_max = torch.where(empty, x_min, x_max)
    y_max = torch.where(empty, y_min, y_max)
    return TileBounds(x_min, x_max, y_min, y_max)


class TileIntersections(NamedTuple):
    """Splat ids grouped by tile (row-major over the rendered tile rows) and depth-sorted inside a tile."""

    gaussian_ids: Tensor  # [M] int64
    tile_offsets: Tensor  # [num_tiles + 1] int64: tile t owns gaussian_ids[offsets[t]:offsets[t+1]]
    tile_row_start: int
    tile_row_end: int
    tiles_x: int


def intersect_tiles(
    means2d: Tensor,
    radii: Tensor,
    depths: Tensor,
    width: int,
    height: int,
    tile_row_start: int = 0,
    tile_row_end: int | None = None,
    tile_size: int = TILE_SIZE,
) -> TileIntersections:
    """Bin N splats into the tiles of rows [tile_row_start, tile_row_end) and sort each tile by depth.

    Ties in depth keep the splat order (stable sort), so every backend blends in the same order.
    """
    tiles_x, tiles_y = tile_grid(width, height, tile_size)
    tile_row_end = tiles_y if tile_row_end is None else tile_row_end
    bounds = tile_bounds(means2d, radii, width, height, tile_size)
    y_min = bounds.y_min.clamp(tile_row_start, tile_row_end)
    y_max = bounds.y_max.clamp(tile_row_start, tile_row_end)
    span_x = (bounds.x_max - bounds.x_min).clamp_min(0)
    span_y = (y_max - y_min).clamp_min(0)
    counts = span_x * span_y
    device = means2d.device
    num_tiles = (tile_row_end - tile_row_start) * tiles_x

    depth_order = torch.sort(depths.detach(), stable=True).indices
    counts_sorted = counts[depth_order]
    total = int(counts_sorted.sum())
    gaussian_ids = torch.repeat_interleave(depth_order, counts_sorted)
    if total == 0:
        return TileIntersections(
            gaussian_ids, torch.zeros(num_tiles + 1, dtype=torch.int64, device=device),
            tile_row_start, tile_row_end, tiles_x,
        )
    starts = torch.cumsum(counts_sorted, 0) - counts_sorted
    local = torch.arange(total, device=device) - torch.repeat_interleave(starts, counts_sorted)
    width_x = span_x[gaussian_ids]
    tile_x = bounds.x_min[gaussian_ids] + local % width_x.clamp_min(1)
    tile_y = y_min[gaussian_ids] + local // width_x.clamp_min(1)
    tile_ids = (tile_y - tile_row_start) * tiles_x + tile_x
    tile_order = torch.sort(tile_ids, stable=True).indices
    gaussian_ids = gaussian_ids[tile_order]
    per_tile = torch.bincount(tile_ids, minlength=num_tiles)
    offsets = torch.zeros(num_tiles + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(per_tile, 0)
    return TileIntersections(gaussian_ids, offsets, tile_row_start, tile_row_end, tiles_x)

"""Which pixel rows a splat can change: tighter than its 3-sigma tile box, and still exact.

The rasterizer skips a splat at a pixel where ``opacity * exp(-q) < 1/255`` (``q`` the conic's quadratic
form). Minimising ``q`` over the pixel column leaves ``q = dy^2 / (2 Sigma_yy)``, so a splat can only reach
rows within ``sqrt(2 ln(255 opacity) Sigma_yy)`` of its centre: faint or flat splats reach far fewer rows
than the square box of their largest axis. Grendel sends a splat to a rank only if it can reach that
rank's rows, so every splat left out would have been skipped there anyway.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_grendel.splatting.rasterize.torch_backend import MIN_ALPHA
from lightning_grendel.splatting.tiles import TILE_SIZE, TileBounds, tile_bounds, tile_grid

_SAFETY = 1e-3  # absorbs float32 rounding in the kernels' alpha test, so the bound stays conservative


def reachable_pixel_rows(
    means2d: Tensor, conics: Tensor, opacities: Tensor, bounds: TileBounds
) -> tuple[Tensor, Tensor]:
    """Pixel rows [first, end) each splat can blend into (``first >= end`` where it reaches none).

    Pixel centres sit at ``row + 0.5``. The result is also clipped to the splat's tile box ``bounds``
    (the rasterizer only visits those tiles) and is empty where that box is empty.
    """
    mean_y = means2d.detach()[..., 1].to(torch.float64)
    a, b, c = (conics.detach()[..., i].to(torch.float64) for i in range(3))
    determinant = a * c - b * b
    sigma_yy = a / determinant.clamp_min(1e-300)
    log_ratio = torch.log(opacities.detach().to(torch.float64).clamp_min(1e-300) / MIN_ALPHA) + _SAFETY
    reach = torch.sqrt(2.0 * log_ratio.clamp_min(0.0) * sigma_yy.clamp_min(0.0)) + _SAFETY
    # A conic that is not positive definite (or not finite) gets no bound: its whole tile box.
    definite = (a > 0) & (determinant > 0) & torch.isfinite(reach)
    reach = torch.where(definite, reach, torch.full_like(reach, math.inf))
    first = torch.ceil(mean_y - reach - 0.5).clamp(-1, 2**31).to(torch.int64)
    end = torch.floor(mean_y + reach - 0.5).clamp(-2, 2**31).to(torch.int64) + 1
    first = torch.maximum(first, bounds.y_min * TILE_SIZE)
    end = torch.minimum(end, bounds.y_max * TILE_SIZE)
    empty = (log_ratio < 0) | (bounds.x_max <= bounds.x_min) | (bounds.y_max <= bounds.y_min)
    return first, torch.where(empty, first, end)


def reaches_rows(first: Tensor, end: Tensor, row_start: int, row_end: int) -> Tensor:
    """Boolean mask of splats that can blend into some pixel row in [row_start, row_end)."""
    return (first < end) & (first < row_end) & (end > row_start)



def reachable_tile_row_costs(
    means2d: Tensor, conics: Tensor, opacities: Tensor, radii: Tensor, width: int, height: int
) -> Tensor:
    """Splat-tile pairs per tile row [tiles_y], counting a splat only in the tile rows it can reach.

    A proxy for rendering cost that does not depend on where the rows are cut: every splat that can
    reach a row is sent to whichever rank renders it, so each rank measures the same cost for a row
    as any other would, and the load balancer's recorded costs stay put when the cut moves.
    """
    _, tiles_y = tile_grid(width, height)
    bounds = tile_bounds(means2d, radii, width, height)
    first, end = reachable_pixel_rows(means2d, conics, opacities, bounds)
    reaches = first < end
    first_tile = (first[reaches] // TILE_SIZE).clamp(0, tiles_y)
    end_tile = ((end[reaches] + TILE_SIZE - 1) // TILE_SIZE).clamp(0, tiles_y)
    span_x = (bounds.x_max - bounds.x_min)[reaches].clamp_min(0).to(torch.float64)
    change = torch.zeros(tiles_y + 1, dtype=torch.float64, device=means2d.device)
    change.index_add_(0, first_tile, span_x).index_add_(0, end_tile, -span_x)
    return torch.cumsum(change, 0)[:tiles_y]

"""The rows a splat can reach: every pixel a splat blends into lies inside them (so leaving it out is
exact), and they are tighter than the splat's tile box."""

from __future__ import annotations

import torch

from lightning_grendel.splatting.footprint import reachable_pixel_rows, reachable_tile_row_costs, reaches_rows
from lightning_grendel.splatting.rasterize.torch_backend import MIN_ALPHA
from lightning_grendel.splatting.tiles import TILE_SIZE, tile_bounds
from tests.helpers.scenes import projected_splats

WIDTH, HEIGHT = 64, 80


def brute_force_rows(splats: dict) -> torch.Tensor:
    """[N, H] True where the splat has alpha >= 1/255 at some pixel of the row, inside its tile box."""
    ys, xs = torch.meshgrid(torch.arange(HEIGHT) + 0.5, torch.arange(WIDTH) + 0.5, indexing="ij")
    dx = xs[None] - splats["means2d"][:, 0, None, None]
    dy = ys[None] - splats["means2d"][:, 1, None, None]
    a, b, c = (splats["conics"][:, i, None, None] for i in range(3))
    power = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    alpha = splats["opacities"][:, None, None] * torch.exp(-power)
    bounds = tile_bounds(splats["means2d"], splats["radii"], WIDTH, HEIGHT)
    col = torch.arange(WIDTH) // TILE_SIZE
    row = torch.arange(HEIGHT) // TILE_SIZE
    x_min, x_max, y_min, y_max = (b[:, None, None] for b in bounds)
    in_box = (col[None, None] >= x_min) & (col[None, None] < x_max) & (row[None, :, None] >= y_min) & (
        row[None, :, None] < y_max
    )
    return ((alpha >= MIN_ALPHA) & (power >= 0) & in_box & (splats["radii"] > 0)[:, None, None]).any(dim=2)


def test_every_blended_row_is_reachable_and_the_rows_are_tighter_than_the_tile_box():
    splats = projected_splats(3000, WIDTH, HEIGHT, seed=4)
    opacity = torch.rand(3000, generator=torch.Generator().manual_seed(2))
    splats["opacities"] = torch.cat([opacity[:1000] * 0.02, opacity[1000:]])  # many near the 1/255 cut
    splats["conics"][-20:-10, 0] *= -1  # not positive definite: no bound but the tile box
    splats["conics"][-10:, 1] = splats["conics"][-10:, 0] * 3
    blended = brute_force_rows(splats)
    assert blended.any(dim=1).sum() > 500, "the scene must put many splats on screen"
    bounds = tile_bounds(splats["means2d"], splats["radii"], WIDTH, HEIGHT)
    first, end = reachable_pixel_rows(splats["means2d"], splats["conics"], splats["opacities"], bounds)
    rows = torch.arange(HEIGHT)
    reachable = (rows[None] >= first[:, None]) & (rows[None] < end[:, None])
    assert not (blended & ~reachable).any(), "a splat blends into a row outside its reachable rows"
    for start, stop in [(0, 16), (16, 37), (70, 80)]:
        mask = reaches_rows(first, end, start, stop)
        assert torch.equal(mask | blended[:, start:stop].any(1), mask)
    box_rows = ((bounds.y_max - bounds.y_min) * TILE_SIZE).clamp_min(0) * (bounds.x_max > bounds.x_min)
    assert (end - first).clamp_min(0).sum() < 0.8 * box_rows.sum(), "the footprint should beat the tile box"


def test_tile_row_costs_count_each_splat_in_the_tile_rows_it_reaches():
    splats = projected_splats(500, WIDTH, HEIGHT, seed=6)
    splats["opacities"] = torch.rand(500, generator=torch.Generator().manual_seed(3))
    costs = reachable_tile_row_costs(splats["means2d"], splats["conics"], splats["opacities"], splats["radii"],
                                     WIDTH, HEIGHT)
    bounds = tile_bounds(splats["means2d"], splats["radii"], WIDTH, HEIGHT)
    first, end = reachable_pixel_rows(splats["means2d"], splats["conics"], splats["opacities"], bounds)
    expected = torch.zeros(HEIGHT // TILE_SIZE, dtype=torch.float64)
    for i in range(500):
        for row in range(HEIGHT // TILE_SIZE):
            if reaches_rows(first[i : i + 1], end[i : i + 1], row * TILE_SIZE, (row + 1) * TILE_SIZE).item():
                expected[row] += int(bounds.x_max[i] - bounds.x_min[i])
    assert expected.sum() > 100
    torch.testing.assert_close(costs, expected)

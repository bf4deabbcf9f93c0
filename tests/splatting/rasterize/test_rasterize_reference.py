"""The PyTorch rasterizer against a brute-force per-pixel loop written here from the 3DGS rules."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_grendel.splatting.rasterize import rasterize
from lightning_grendel.splatting.tiles import TILE_SIZE, tile_bounds
from tests.helpers.scenes import projected_splats


def brute_force_pixel(x: int, y: int, splats: dict, width: int, height: int, background: torch.Tensor) -> torch.Tensor:
    """Sequential blending of one pixel, in float64, over every splat whose tile box holds the pixel."""
    bounds = tile_bounds(splats["means2d"], splats["radii"], width, height)
    tx, ty = x // TILE_SIZE, y // TILE_SIZE
    members = [
        i for i in range(len(splats["depths"]))
        if bounds.x_min[i] <= tx < bounds.x_max[i] and bounds.y_min[i] <= ty < bounds.y_max[i]
    ]
    members.sort(key=lambda i: (float(splats["depths"][i]), i))
    color = torch.zeros(3, dtype=torch.float64)
    transmittance = 1.0
    for i in members:
        mx, my = splats["means2d"][i].double().tolist()
        a, b, c = splats["conics"][i].double().tolist()
        dx, dy = x + 0.5 - mx, y + 0.5 - my
        sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
        if sigma < 0:
            continue
        alpha = min(0.99, float(splats["opacities"][i]) * math.exp(-sigma))
        if alpha < 1 / 255:
            continue
        after = transmittance * (1 - alpha)
        if after < 1e-4:
            break
        color += splats["colors"][i].double() * alpha * transmittance
        transmittance = after
    return color + transmittance * background.double()


@pytest.mark.parametrize("row_range", [(0, 40), (5, 29)])
def test_torch_backend_matches_brute_force(row_range):
    width, height = 37, 40
    splats = projected_splats(60, width, height, seed=3)
    splats["opacities"] = splats["opacities"].clamp(0.3, 1.0)  # reach saturation and early stops
    background = torch.tensor([0.2, 0.4, 0.6])
    image = rasterize(**splats, width=width, height=height, background=background,
                      row_start=row_range[0], row_end=row_range[1], backend="torch")
    assert image.shape == (row_range[1] - row_range[0], width, 3)
    for y in range(row_range[0], row_range[1], 3):
        for x in range(0, width, 4):
            expected = brute_force_pixel(x, y, splats, width, height, background)
            torch.testing.assert_close(image[y - row_range[0], x].double(), expected, atol=1e-5, rtol=1e-5)


def test_rows_of_a_partial_render_equal_the_full_render():
    width, height = 50, 70
    splats = projected_splats(200, width, height, seed=1)
    full = rasterize(**splats, width=width, height=height, backend="torch")
    part = rasterize(**splats, width=width, height=height, row_start=21, row_end=53, backend="torch")
    torch.testing.assert_close(part, full[21:53], atol=0, rtol=0)


def test_bad_row_range_is_rejected():
    splats = projected_splats(5, 16, 16)
    with pytest.raises(ValueError, match="row range"):
        rasterize(**splats, width=16, height=16, row_start=4, row_end=20)

"""Tile-based front-to-back alpha compositing in pure PyTorch: the reference every backend is tested against.

Differentiable through autograd and device-agnostic. Tiles are processed in chunks of similar splat
counts so the padded [tiles, splats, 256 pixels] tensors stay small. With an ``absgrad_probe`` the
per-(splat, pixel) offsets pass through :class:`_AbsGradTap`, whose backward also sums each pixel's
|gradient| into the probe: autograd alone only ever gives the sum over pixels of the signed gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_grendel.splatting.rasterize.splats import PixelRows, Splats
from lightning_grendel.splatting.tiles import TILE_SIZE, intersect_tiles

MAX_ALPHA = 0.99
MIN_ALPHA = 1.0 / 255.0
MIN_TRANSMITTANCE = 1e-4
_CHUNK_ELEMENTS = 1 << 22


class _AbsGradTap(torch.autograd.Function):
    """Identity on the pixel offsets [T, M, P, 2]; backward also gives ``probe`` [T, M, 2] the sum over P of
    |gradient| (d/d means2d = -d/d offset, the same absolute value)."""

    @staticmethod
    def forward(ctx, delta: Tensor, probe: Tensor) -> Tensor:  # noqa: ANN001 - autograd's ctx
        return delta.view_as(delta)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # noqa: ANN001
        return grad, grad.abs().sum(2)


def blend_tile_chunk(
    pixels: Tensor, means2d: Tensor, conics: Tensor, opacities: Tensor, colors: Tensor, valid: Tensor,
    background: Tensor, probe: Tensor | None = None,
) -> Tensor:
    """Composite depth-sorted splats [T, M, ...] over the pixels [T, P, 2] of T tiles; returns [T, P, D].

    ``valid`` [T, M] masks padding. A splat is skipped where alpha < 1/255 or its quadratic form is
    negative; blending stops before the splat that would take the transmittance below 1e-4. ``probe``
    [T, M, 2] receives the per-pixel absolute gradients of the means (padding slots get zeros).
    """
    delta = pixels[:, None, :, :] - means2d[:, :, None, :]  # [T, M, P, 2]
    if probe is not None:
        delta = _AbsGradTap.apply(delta, probe)
    dx, dy = delta[..., 0], delta[..., 1]
    a, b, c = conics[..., 0, None], conics[..., 1, None], conics[..., 2, None]
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    alpha = (opacities[..., None] * torch.exp(-sigma)).clamp_max(MAX_ALPHA)
    used = valid[..., None] & (sigma >= 0) & (alpha >= MIN_ALPHA)
    alpha = torch.where(used, alpha, torch.zeros_like(alpha))
    with torch.no_grad():
        alive = torch.cumprod(1.0 - alpha, dim=1) >= MIN_TRANSMITTANCE
    alpha = alpha * alive
    transmittance = torch.cumprod(1.0 - alpha, dim=1)
    before = torch.cat([torch.ones_like(transmittance[:, :1]), transmittance[:, :-1]], dim=1)
    weights = alpha * before
    color = torch.einsum("tmp,tmd->tpd", weights, colors)
    return color + transmittance[:, -1, :, None] * background


def rasterize_torch(splats: Splats, rows: PixelRows) -> Tensor:
    """Render ``rows`` of one image; see :func:`~lightning_grendel.splatting.rasterize.rasterize`."""
    means2d, conics, colors, opacities = splats.means2d, splats.conics, splats.colors, splats.opacities
    probe = splats.absgrad_probe
    width, row_start, row_end, background = rows.width, rows.row_start, rows.row_end, rows.background
    tile_row_start = row_start // TILE_SIZE
    tile_row_end = (row_end + TILE_SIZE - 1) // TILE_SIZE
    bins = intersect_tiles(means2d, splats.radii, splats.depths, width, rows.height, tile_row_start, tile_row_end)
    tiles_x = bins.tiles_x
    num_tiles = (tile_row_end - tile_row_start) * tiles_x
    channels = colors.shape[-1]
    dtype, device = colors.dtype, colors.device

    pixel_offsets = torch.stack(
        torch.meshgrid(
            torch.arange(TILE_SIZE, device=device, dtype=dtype),
            torch.arange(TILE_SIZE, device=device, dtype=dtype),
            indexing="ij",
        )[::-1],
        dim=-1,
    ).reshape(-1, 2)  # (x, y) within a tile, row-major
    tile_index = torch.arange(num_tiles, device=device)
    tile_origin = torch.stack(
        [(tile_index % tiles_x) * TILE_SIZE, (tile_index // tiles_x + tile_row_start) * TILE_SIZE], dim=-1
    ).to(dtype)

    counts = bins.tile_offsets.diff()
    order = torch.argsort(counts)
    chunks: list[Tensor] = []
    chunk_tiles: list[Tensor] = []
    start = 0
    while start < num_tiles:
        stop = start + 1
        while stop < num_tiles and (stop + 1 - start) * int(counts[order[stop]]) * TILE_SIZE**2 <= _CHUNK_ELEMENTS:
            stop += 1
        tiles = order[start:stop]
        max_count = int(counts[tiles].max()) if len(tiles) else 0
        pixels = tile_origin[tiles, None, :] + pixel_offsets[None] + 0.5
        if max_count == 0:
            chunks.append(background.to(dtype).expand(len(tiles), TILE_SIZE**2, channels))
        else:
            slot = torch.arange(max_count, device=device)
            valid = slot[None, :] < counts[tiles, None]
            index = (bins.tile_offsets[tiles, None] + slot[None, :]).clamp_max(max(len(bins.gaussian_ids) - 1, 0))
            ids = torch.where(valid, bins.gaussian_ids[index], torch.zeros_like(index))
            chunks.append(
                blend_tile_chunk(
                    pixels, means2d[ids], conics[ids], opacities[ids], colors[ids], valid, background.to(dtype),
                    None if probe is None else probe[ids],
                )
            )
        chunk_tiles.append(tiles)
        start = stop
    stacked = torch.cat(chunks)[torch.argsort(torch.cat(chunk_tiles))]  # back to row-major tile order
    image = (
        stacked.reshape(tile_row_end - tile_row_start, tiles_x, TILE_SIZE, TILE_SIZE, channels)
        .permute(0, 2, 1, 3, 4)
        .reshape((tile_row_end - tile_row_start) * TILE_SIZE, tiles_x * TILE_SIZE, channels)
    )
    offset = row_start - tile_row_start * TILE_SIZE
    return image[offset : offset + row_end - row_start, :width]

"""``backend="gsplat"``: gsplat's CUDA tile rasterizer fed with our splats (optional extra ``[cuda]``).

Same conventions as the reference: pixel centres at +0.5, 16-pixel tiles, per-tile depth order, and
only the tile rows covering [row_start, row_end) are rendered (the splats are shifted up so that the
first of those tile rows is gsplat's row 0). gsplat is imported only when this backend is used.
With an ``absgrad_probe``, gsplat runs with ``absgrad=True`` on an inner graph (:class:`_InnerAbsGrad`):
gsplat leaves the per-pixel absolute gradients as an ``absgrad`` attribute of its means input, which
becomes the probe's gradient, so they travel through autograd (and Grendel's exchange) like any other.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_grendel.splatting.rasterize.splats import PixelRows, Splats
from lightning_grendel.splatting.tiles import TILE_SIZE, tile_grid


def gsplat_available() -> bool:
    """Whether gsplat is installed and a CUDA device is present."""
    return torch.cuda.is_available() and importlib.util.find_spec("gsplat") is not None


class _InnerAbsGrad(torch.autograd.Function):
    """Runs ``render`` (gsplat with ``absgrad=True``) on detached copies; backward replays its graph."""

    @staticmethod
    def forward(ctx: Any, means2d: Tensor, conics: Tensor, colors: Tensor, opacities: Tensor, background: Tensor,
                probe: Tensor, render: Callable[..., Tensor]) -> Tensor:
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(i == 0 or ctx.needs_input_grad[i])
                      for i, t in enumerate((means2d, conics, colors, opacities, background))]
            image = render(*inputs)
        ctx.inner, ctx.probe_shape = (inputs, image), probe.shape
        return image.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        inputs, image = ctx.inner
        wanted = [t for t in inputs if t.requires_grad]
        found = iter(torch.autograd.grad(image, wanted, grad, allow_unused=True))
        grads = [next(found) if t.requires_grad else None for t in inputs]
        absgrad = getattr(inputs[0], "absgrad", None)
        if absgrad is None:
            raise RuntimeError("gsplat did not set means2d.absgrad; this gsplat version cannot give absgrad")
        return (*grads, absgrad.reshape(ctx.probe_shape), None)


def rasterize_gsplat(splats: Splats, rows: PixelRows) -> Tensor:
    """Render ``rows`` of one image with gsplat; see :func:`~lightning_grendel.splatting.rasterize.rasterize`."""
    means2d, conics, colors, opacities = splats.means2d, splats.conics, splats.colors, splats.opacities
    depths, radii = splats.depths, splats.radii
    width, row_start, row_end, background = rows.width, rows.row_start, rows.row_end, rows.background
    if means2d.device.type != "cuda":
        raise ValueError(f"rasterizer backend 'gsplat' needs CUDA tensors, got {means2d.device}")
    if importlib.util.find_spec("gsplat") is None:
        raise ImportError("rasterizer backend 'gsplat' needs gsplat: pip install 'lightning-grendel[cuda]'")
    import gsplat
    from gsplat import isect_offset_encode, isect_tiles, rasterize_to_pixels

    tiles_x, _ = tile_grid(width, rows.height)
    tile_row_start, tile_row_end = row_start // TILE_SIZE, (row_end + TILE_SIZE - 1) // TILE_SIZE
    strip_height = (tile_row_end - tile_row_start) * TILE_SIZE
    shifted = means2d - means2d.new_tensor([0.0, tile_row_start * TILE_SIZE])
    radii = radii.to(torch.int32)
    major, minor = (int(part) for part in gsplat.__version__.split(".")[:2])
    if (major, minor) >= (1, 5):  # per-axis radii since gsplat 1.5
        radii = radii[:, None].expand(-1, 2).contiguous()
    _, isect_ids, flatten_ids = isect_tiles(
        shifted[None], radii[None], depths[None].detach(), TILE_SIZE, tiles_x, tile_row_end - tile_row_start
    )
    offsets = isect_offset_encode(isect_ids, 1, tiles_x, tile_row_end - tile_row_start)
    absgrad = splats.absgrad_probe is not None

    def render(means: Tensor, conic: Tensor, color: Tensor, opacity: Tensor, back: Tensor) -> Tensor:
        image, _ = rasterize_to_pixels(  # inputs with a leading camera axis of 1
            means, conic, color, opacity, width, strip_height, TILE_SIZE, offsets, flatten_ids, backgrounds=back,
            absgrad=absgrad,
        )
        return image

    batched = (shifted[None].contiguous(), conics[None], colors[None], opacities[None], background[None])
    if absgrad:
        image = _InnerAbsGrad.apply(*batched, splats.absgrad_probe, render)
    else:
        image = render(*batched)
    offset = row_start - tile_row_start * TILE_SIZE
    return image[0, offset : offset + row_end - row_start]

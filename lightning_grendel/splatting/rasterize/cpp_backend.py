"""The C++/OpenMP CPU rasterizer behind ``rasterize(..., backend="cpp")``; its source ships in the package.

The extension is compiled on first use for this CPU and cached (see
:mod:`lightning_grendel.splatting.cpp_build`), so later processes only load it. If compiling fails the
backend warns once, naming the file with the compiler output, and renders with the PyTorch reference
instead: slower, never wrong.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_grendel.splatting.cpp_build import extension_directory, load_cpp_extension
from lightning_grendel.splatting.rasterize.splats import PixelRows, Splats
from lightning_grendel.splatting.rasterize.torch_backend import rasterize_torch

EXTENSION_NAME = "lightning_grendel_rasterize"
SOURCE = Path(__file__).resolve().parent / "csrc" / "rasterize.cpp"


def build_directory() -> Path:
    """Where the compiled extension lives (see :mod:`lightning_grendel.splatting.cpp_build`)."""
    return extension_directory(EXTENSION_NAME)


def load_extension() -> ModuleType | None:
    """The extension module, or ``None`` if it cannot be built (warned about once per process)."""
    return load_cpp_extension(EXTENSION_NAME, [SOURCE])


def cpp_available() -> bool:
    """Whether the C++ rasterizer is built (building it now if needed)."""
    return load_extension() is not None


class _RasterizeCpp(torch.autograd.Function):
    """Forward saves the tile lists, final transmittance and last contributor that backward replays."""

    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, background, depths, radii, width, height, row_start, row_end):
        ext = load_extension()
        image, final_t, last, offsets, ids, _ = ext.forward(
            means2d, conics, colors, opacities, depths, radii, width, height, background, row_start, row_end
        )
        ctx.save_for_backward(means2d, conics, colors, opacities, background, offsets, ids, final_t, last)
        ctx.frame = (width, height, row_start, row_end)
        return image

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_image):
        means2d, conics, colors, opacities, background, offsets, ids, final_t, last = ctx.saved_tensors
        grads = load_extension().backward(
            means2d, conics, colors, opacities, background, *ctx.frame, offsets, ids, final_t, last,
            grad_image.contiguous(),
        )
        grad_background = None
        if ctx.needs_input_grad[4]:
            grad_background = (grad_image * final_t[..., None]).sum((0, 1))
        return (*grads, grad_background, None, None, None, None, None, None)


def prepare_inputs(splats: Splats, background: Tensor) -> tuple[Tensor, ...]:
    """Contiguous CPU tensors in one float dtype (float64 stays float64; other dtypes compute in float32).

    Returns (means2d, conics, colors, opacities, depths, background, radii). Depths go as float64 (exact
    for any float input, so the depth order and its ties are unchanged) and radii as float32, the type
    the tile bounds are computed in.
    """
    if splats.means2d.device.type != "cpu":
        raise ValueError(f"rasterizer backend 'cpp' runs on CPU tensors, got {splats.means2d.device}")
    dtype = splats.colors.dtype if splats.colors.dtype in (torch.float32, torch.float64) else torch.float32
    floats = [t.to(dtype).contiguous() for t in (splats.means2d, splats.conics, splats.colors, splats.opacities)]
    depths = splats.depths.detach().to(torch.float64).contiguous()
    return (*floats, depths, background.to(dtype).contiguous(), splats.radii.to(torch.float32).contiguous())


def rasterize_cpp(splats: Splats, rows: PixelRows) -> Tensor:
    """Render ``rows`` of one image in C++; see :func:`~lightning_grendel.splatting.rasterize.rasterize`."""
    if load_extension() is None:
        return rasterize_torch(splats, rows)
    means2d, conics, colors, opacities, depths, background, radii = prepare_inputs(splats, rows.background)
    image = _RasterizeCpp.apply(
        means2d, conics, colors, opacities, background, depths, radii, rows.width, rows.height, rows.row_start,
        rows.row_end,
    )
    return image.to(splats.colors.dtype)

"""The C++/OpenMP CPU rasterizer behind ``rasterize(..., backend="cpp")``; its source ships in the package.

The extension is compiled on first use for this CPU and cached (see
:mod:`lightning_grendel.splatting.cpp_build`), so later processes only load it. If compiling fails the
backend warns once, naming the file with the compiler output, and renders with the PyTorch reference
instead: slower, never wrong.

Two kernels share the binning rules, the per-row pixel spans and the per-pixel test: ``scalar``
(``csrc/rasterize.cpp``: one pixel at a time, transmittance and colour in double; any float dtype, the
reference) and ``simd`` (``csrc/simd_*.cpp``: lane groups of 8 pixels on AVX2, 16 on AVX-512, float32, a
polynomial exp within 2^-22 relative). The default ``impl="auto"`` runs ``simd`` on float32 and
``scalar`` on float64: at 100k Gaussians / 400x400 on 2 cores ``simd`` is 4.4-4.9x faster with AVX-512 and
3.5-4.3x with AVX2 (docs/results/rasterizer.md).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_grendel.splatting.cpp_build import RASTERIZE, extension_directory, load_cpp_extension
from lightning_grendel.splatting.rasterize.splats import PixelRows, Splats
from lightning_grendel.splatting.rasterize.torch_backend import rasterize_torch

EXTENSION = RASTERIZE  # sources: csrc/rasterize.cpp (scalar) and csrc/simd_*.cpp
IMPLS = ("auto", "scalar", "simd")


def build_directory() -> Path:
    """Where the compiled extension lives (see :mod:`lightning_grendel.splatting.cpp_build`)."""
    return extension_directory(EXTENSION)


def load_extension() -> ModuleType | None:
    """The extension module, or ``None`` if it cannot be built (warned about once per process)."""
    return load_cpp_extension(EXTENSION)


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
        return (*grads, _background_grad(ctx, grad_image, final_t), None, None, None, None, None, None)


class _RasterizeSimd(torch.autograd.Function):
    """The vectorised kernel; forward also saves its tile lists, record slots and prepared splats for backward."""

    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, background, depths, radii, width, height, row_start, row_end):
        image, final_t, last, *lists, _ = load_extension().forward_simd(
            means2d, conics, colors, opacities, depths, radii, width, height, background, row_start, row_end
        )
        ctx.save_for_backward(means2d, conics, colors, opacities, background, *lists, final_t, last)
        ctx.frame = (width, height, row_start, row_end)
        return image

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_image):
        *inputs, final_t, last = ctx.saved_tensors
        grads = load_extension().backward_simd(
            *inputs[:5], *ctx.frame, *inputs[5:], final_t, last, grad_image.contiguous()
        )
        return (*grads, _background_grad(ctx, grad_image, final_t), None, None, None, None, None, None)


def _background_grad(ctx, grad_image: Tensor, final_t: Tensor) -> Tensor | None:
    """d image / d background = final transmittance, per channel."""
    if not ctx.needs_input_grad[4]:
        return None
    return (grad_image * final_t[..., None]).sum((0, 1))


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


def rasterize_cpp(splats: Splats, rows: PixelRows, impl: str = "auto") -> Tensor:
    """Render ``rows`` of one image in C++; see :func:`~lightning_grendel.splatting.rasterize.rasterize`.

    ``impl`` picks the kernel: ``"scalar"`` (any float dtype), ``"simd"`` (float32 only) or ``"auto"``
    (``simd`` for float32, ``scalar`` for float64).
    """
    if impl not in IMPLS:
        raise ValueError(f"rasterize_cpp: impl must be one of {IMPLS}, got {impl!r}")
    if load_extension() is None:
        return rasterize_torch(splats, rows)
    means2d, conics, colors, opacities, depths, background, radii = prepare_inputs(splats, rows.background)
    if impl == "auto":
        impl = "simd" if colors.dtype == torch.float32 else "scalar"
    if impl == "simd" and colors.dtype != torch.float32:
        raise ValueError(f"rasterize_cpp: impl='simd' computes in float32, got {colors.dtype}; use impl='scalar'")
    function = _RasterizeSimd if impl == "simd" else _RasterizeCpp
    image = function.apply(
        means2d, conics, colors, opacities, background, depths, radii, rows.width, rows.height, rows.row_start,
        rows.row_end,
    )
    return image.to(splats.colors.dtype)

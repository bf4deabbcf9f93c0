"""One rasterization entry point over several backends (the gsplat pattern).

``torch`` is the pure-PyTorch reference and runs anywhere; faster backends register themselves in
:data:`BACKENDS` and are tested against it. ``auto`` picks the fastest one available for the device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_grendel.splatting.rasterize.cpp_backend import cpp_available, rasterize_cpp
from lightning_grendel.splatting.rasterize.gsplat_backend import gsplat_available, rasterize_gsplat
from lightning_grendel.splatting.rasterize.splats import PixelRows, Splats
from lightning_grendel.splatting.rasterize.torch_backend import rasterize_torch

__all__ = ["BACKENDS", "PixelRows", "Splats", "rasterize", "resolve_backend"]

log = logging.getLogger(__name__)

RasterizeFn = Callable[[Splats, PixelRows], Tensor]
BACKENDS: dict[str, RasterizeFn] = {"torch": rasterize_torch, "cpp": rasterize_cpp, "gsplat": rasterize_gsplat}
ABSGRAD_BACKENDS = ("torch", "gsplat")  # the cpp kernel's backward sums per tile, not per pixel
_announced: set[tuple[str, str]] = set()


def resolve_backend(backend: str, device: torch.device) -> str:
    """Name of the backend ``rasterize`` will use for ``backend`` on ``device``; logs the choice once."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown rasterizer backend {backend!r}; choose one of {['auto', *BACKENDS]}")
        return backend
    if device.type == "cpu":
        chosen = "cpp" if cpp_available() else "torch"
    else:
        chosen = "gsplat" if device.type == "cuda" and gsplat_available() else "torch"
    key = (chosen, device.type)
    if key not in _announced:
        _announced.add(key)
        log.info("rasterizer backend 'auto' -> %r on %s", chosen, device.type)
    return chosen


def rasterize(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    depths: Tensor,
    radii: Tensor,
    width: int,
    height: int,
    background: Tensor | None = None,
    row_start: int = 0,
    row_end: int | None = None,
    backend: str = "auto",
    absgrad_probe: Tensor | None = None,
) -> Tensor:
    """Alpha-composite N projected splats into pixel rows [row_start, row_end) of a ``width`` x ``height`` image.

    Inputs are one camera's splats: ``means2d`` [N, 2] (pixel centres at x + 0.5), ``conics`` [N, 3],
    ``colors`` [N, D], ``opacities`` [N] (activated), ``depths`` [N], ``radii`` [N] (0 = culled).
    Returns [row_end - row_start, width, D], differentiable w.r.t. means2d, conics, colors and opacities.
    ``absgrad_probe`` [N, 2] (zeros, requires grad) collects the per-pixel absolute gradients of
    ``means2d`` (AbsGS densification); a backend without them (``cpp``) hands this call to ``torch``,
    warning once.
    """
    row_end = height if row_end is None else row_end
    if not 0 <= row_start <= row_end <= height:
        raise ValueError(f"rasterize: row range [{row_start}, {row_end}) is not inside an image of height {height}")
    if background is None:
        background = torch.zeros(colors.shape[-1], dtype=colors.dtype, device=colors.device)
    splats = Splats(means2d, conics, colors, opacities, depths, radii, absgrad_probe)
    rows = PixelRows(width, height, row_start, row_end, background)
    chosen = resolve_backend(backend, means2d.device)
    if absgrad_probe is not None and chosen not in ABSGRAD_BACKENDS:
        if ("absgrad", chosen) not in _announced:
            _announced.add(("absgrad", chosen))
            log.warning("rasterizer backend %r has no per-pixel absolute gradients (absgrad): rendering with "
                        "'torch' instead, which is slower", chosen)
        chosen = "torch"
    return BACKENDS[chosen](splats, rows)

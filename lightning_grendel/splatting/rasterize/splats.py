"""What every rasterizer backend takes: one camera's projected splats and the pixel rows to render."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor


@dataclass(frozen=True)
class Splats:
    """One camera's projected splats, one row each.

    ``means2d`` [N, 2] (pixel centres at x + 0.5), ``conics`` [N, 3] (upper triangle of the inverse 2-D
    covariance), ``colors`` [N, D], ``opacities`` [N] (activated), ``depths`` [N] (the sort key) and
    ``radii`` [N] (pixels; 0 = culled).
    """

    means2d: Tensor
    conics: Tensor
    colors: Tensor
    opacities: Tensor
    depths: Tensor
    radii: Tensor

    def replace(self, **fields: Tensor) -> Splats:
        """A copy with some fields swapped (e.g. the same splats in another dtype)."""
        return replace(self, **fields)


@dataclass(frozen=True)
class PixelRows:
    """Pixel rows [row_start, row_end) of a ``width`` x ``height`` image over a ``background`` [D]."""

    width: int
    height: int
    row_start: int
    row_end: int
    background: Tensor

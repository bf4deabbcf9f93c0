"""What every rasterizer backend takes: one camera's projected splats and the pixel rows to render."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor


@dataclass(frozen=True)
class Splats:
    """Projected splats, one row each: for one camera as below, or with a leading camera axis [C, N, ...].

    ``means2d`` [N, 2] (pixel centres at x + 0.5), ``conics`` [N, 3] (upper triangle of the inverse 2-D
    covariance), ``colors`` [N, D], ``opacities`` [N] (activated), ``depths`` [N] (the sort key) and
    ``radii`` [N] (pixels; 0 = culled). ``absgrad_probe`` [N, 2], when given, is a zero tensor that
    requires grad: after backward its gradient is each splat's sum over pixels of |d loss / d means2d|,
    component-wise (AbsGS), which backends that support it (torch, gsplat) fill in.
    """

    means2d: Tensor
    conics: Tensor
    colors: Tensor
    opacities: Tensor
    depths: Tensor
    radii: Tensor
    absgrad_probe: Tensor | None = None

    def replace(self, **fields: Tensor) -> Splats:
        """A copy with some fields swapped (e.g. the same splats in another dtype)."""
        return replace(self, **fields)

    def camera(self, index: int) -> Splats:
        """Camera ``index``'s splats from a bundle with a leading camera axis."""
        probe = None if self.absgrad_probe is None else self.absgrad_probe[index]
        return Splats(*(tensor[index] for tensor in self.tensors()), absgrad_probe=probe)

    def tensors(self) -> tuple[Tensor, ...]:
        """(means2d, conics, colors, opacities, depths, radii): the order ``rasterize`` takes them in."""
        return self.means2d, self.conics, self.colors, self.opacities, self.depths, self.radii


@dataclass(frozen=True)
class PixelRows:
    """Pixel rows [row_start, row_end) of a ``width`` x ``height`` image over a ``background`` [D]."""

    width: int
    height: int
    row_start: int
    row_end: int
    background: Tensor

"""From 3-D Gaussians to pixels: per-camera splats, and the single-process renderer.

The renderer is the seam between a Gaussian LightningModule and a strategy: the module calls
``renderer(params, cameras, ...)`` and gets back which rows of which views were rendered here. The
single-process renderer renders every row of every view; a distributed renderer (GrendelStrategy)
renders only this rank's pixel partition, and the same ``training_step`` works with both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from lightning_grendel.splatting.cameras import Cameras
from lightning_grendel.splatting.fused_projection import fused_projection_available, project_and_shade
from lightning_grendel.splatting.gaussians import activated_opacities, activated_scales, sh_coefficients
from lightning_grendel.splatting.gsplat_projection import gsplat_projection_available, project_and_shade_gsplat
from lightning_grendel.splatting.projection import RasterizeMode, project_gaussians
from lightning_grendel.splatting.rasterize import Splats, rasterize
from lightning_grendel.splatting.sh import sh_to_rgb

Projection = Literal["auto", "torch", "cpp", "gsplat"]
PROJECTIONS = get_args(Projection)


def splat_gaussians(
    params: dict[str, Tensor], cameras: Cameras, sh_degree: int, rasterize_mode: RasterizeMode = "classic",
    absgrad: bool = False, projection: Projection = "auto",
) -> Splats:
    """Project Gaussians onto every camera and evaluate their view-dependent colour: splats [C, N, ...].

    In ``antialiased`` mode the opacities carry the 2-D filter's compensation, so every backend (and
    Grendel's exchange) gets anti-aliased splats without a change of its own. ``absgrad`` adds a zero
    ``absgrad_probe`` [C, N, 2] leaf for the per-pixel absolute gradients of the means (AbsGS).

    Args:
        params: raw Gaussian parameters (means, log-scales, quats, opacity logits, sh0, shN).
        cameras: the C cameras to project onto.
        sh_degree: SH degree 0..3 of the colours.
        rasterize_mode: ``"classic"`` or ``"antialiased"``.
        absgrad: whether to add the ``absgrad_probe`` leaf.
        projection: ``"cpp"`` the fused C++ projection + SH colour on the CPU, ``"gsplat"`` gsplat's
            fused CUDA kernels (:mod:`~.gsplat_projection`), ``"torch"`` the reference
            ``project_gaussians`` + ``sh_to_rgb``; ``"auto"`` the fused one that applies to the
            inputs, else the reference. Naming one that does not apply is an error.
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    means, quats, scales = params["means"], params["quats"], activated_scales(params)
    bands = (params["sh0"], params["shN"])  # the fused op joins them itself, keeping no joined copy
    use_cpp = projection in ("auto", "cpp") and fused_projection_available(means, quats, scales, bands, cameras)
    # cpp needs CPU tensors and gsplat CUDA ones, so at most one of the two applies.
    use_gsplat = projection in ("auto", "gsplat") and gsplat_projection_available(means, cameras)
    if projection == "cpp" and not use_cpp:
        raise ValueError("projection='cpp' needs CPU float32/float64 inputs, constant cameras and the built extension")
    if projection == "gsplat" and not use_gsplat:
        raise ValueError("projection='gsplat' needs float32 CUDA inputs, constant cameras and gsplat installed")
    if use_cpp:
        projected, colors = project_and_shade(means, quats, scales, bands, cameras, sh_degree, rasterize_mode)
    elif use_gsplat:
        projected, colors = project_and_shade_gsplat(
            means, quats, scales, sh_coefficients(params), cameras, sh_degree, rasterize_mode
        )
    else:
        projected = project_gaussians(means, quats, scales, cameras, rasterize_mode)
        directions = means[None] - cameras.centers.to(means.dtype)[:, None]
        colors = sh_to_rgb(sh_degree, sh_coefficients(params)[None], directions)
    opacities = activated_opacities(params)[None].expand(len(cameras), -1)
    if projected.compensations is not None:
        opacities = opacities * projected.compensations
    probe = torch.zeros_like(projected.means2d.detach(), requires_grad=True) if absgrad else None
    return Splats(projected.means2d, projected.conics, colors, opacities, projected.depths, projected.radii, probe)


@dataclass
class ViewRender:
    """Rows [row_start, row_end) of batch view ``view``; this rank's loss covers rows [own_start, own_end)."""

    view: int
    image: Tensor  # [row_end - row_start, W, 3]
    row_start: int
    row_end: int
    own_start: int
    own_end: int


@dataclass
class RenderResult:
    """What one rank rendered, plus its own Gaussians' 2-D means and radii (for densification statistics).

    ``absgrad`` (asked for with ``absgrad=True``) is a zero leaf [C, N_local, 2] whose gradient, after
    backward, is each Gaussian's per-view sum over pixels of |d loss / d means2d|, wherever it was rendered.
    """

    views: list[ViewRender]
    means2d: Tensor  # [C, N_local, 2], gradients retained
    radii: Tensor  # [C, N_local]
    width: int
    height: int
    absgrad: Tensor | None = None


class SingleProcessRenderer:
    """Renders every row of every view in this process (a :class:`~.protocols.Renderer`)."""

    def __init__(self, backend: str = "auto", rasterize_mode: RasterizeMode = "classic",
                 projection: Projection = "auto") -> None:
        self.backend = backend
        self.rasterize_mode = rasterize_mode
        self.projection = projection
        self.last_stats: dict[str, float] = {}

    def __call__(
        self, params: dict[str, Tensor], cameras: Cameras, sh_degree: int, background: Tensor, halo: int = 0,
        absgrad: bool = False,
    ) -> RenderResult:
        splats = splat_gaussians(params, cameras, sh_degree, self.rasterize_mode, absgrad, self.projection)
        if splats.means2d.requires_grad:
            splats.means2d.retain_grad()
        width, height = cameras.width, cameras.height
        views = []
        for view in range(len(cameras)):
            one = splats.camera(view)
            image = rasterize(*one.tensors(), width, height, background, backend=self.backend,
                              absgrad_probe=one.absgrad_probe)
            views.append(ViewRender(view, image, 0, height, 0, height))
        return RenderResult(views, splats.means2d, splats.radii, width, height, splats.absgrad_probe)

    def render_full(self, params: dict[str, Tensor], cameras: Cameras, sh_degree: int, background: Tensor) -> Tensor:
        """Whole images [C, H, W, 3] of ``cameras``."""
        return torch.stack([view.image for view in self(params, cameras, sh_degree, background).views])

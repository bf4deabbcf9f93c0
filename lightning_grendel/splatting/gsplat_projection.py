"""Projection + SH colour on CUDA through gsplat's fused kernels (``projection="gsplat"`` in ``splat_gaussians``).

The torch ``project_gaussians`` + ``sh_to_rgb`` launch a few hundred small kernels per render, forward
and backward; gsplat does each in one. Same formulas (EWA with the 0.3 px² low-pass, the 1.3 x fov
clamp of the Jacobian, near plane 0.01, ``max(SH + 0.5, 0)``), so means, conics, depths, compensations
and colours equal the reference to float rounding. Two conventions are gsplat's: its 3-sigma box is
per axis with 3.33 sigma (since gsplat 1.5), and it culls a pair when that box misses the image.
``radii`` here is the larger of the two axes, so the tile lists differ from the reference's only
where a splat's faint edge (alpha below about 0.01 x opacity) reaches a tile. Culled pairs get zeros
instead of gsplat's unwritten memory, so their values are finite and no gradient reaches them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_grendel.splatting.cameras import Cameras
from lightning_grendel.splatting.projection import LOW_PASS, NEAR_PLANE, Projected, RasterizeMode, check_rasterize_mode
from lightning_grendel.splatting.rasterize import gsplat_available


def gsplat_projection_available(means: Tensor, cameras: Cameras) -> bool:
    """Whether gsplat's fused projection applies: float32 CUDA tensors, constant cameras, gsplat installed.

    Args:
        means: Gaussian centres [N, 3].
        cameras: the camera batch; a camera that requires grad (pose refinement) rules it out.
    """
    camera_tensors = (cameras.world_to_camera, cameras.intrinsics)
    on_cuda = means.device.type == "cuda" and all(t.device.type == "cuda" for t in camera_tensors)
    constant_cameras = not any(t.requires_grad for t in camera_tensors)
    return on_cuda and means.dtype == torch.float32 and constant_cameras and gsplat_available()


def project_and_shade_gsplat(
    means: Tensor, quats: Tensor, scales: Tensor, coefficients: Tensor, cameras: Cameras, sh_degree: int,
    rasterize_mode: RasterizeMode = "classic",
) -> tuple[Projected, Tensor]:
    """gsplat's ``fully_fused_projection`` and ``spherical_harmonics`` for every (camera, Gaussian) pair.

    Arguments and results as :func:`~.fused_projection.project_and_shade` (the CPU op); call only where
    :func:`gsplat_projection_available` holds.
    """
    check_rasterize_mode(rasterize_mode)
    from gsplat import fully_fused_projection, spherical_harmonics

    antialiased = rasterize_mode == "antialiased"
    radii, means2d, depths, conics, compensations = fully_fused_projection(
        means, None, quats, scales, cameras.world_to_camera.float(), cameras.intrinsics.float(),
        cameras.width, cameras.height, eps2d=LOW_PASS, near_plane=NEAR_PLANE, calc_compensations=antialiased,
    )
    if radii.dim() == depths.dim():  # gsplat < 1.5: one radius per pair
        radii = radii[..., None]
    kept = (radii > 0).all(dim=-1)  # [C, N]
    means2d = torch.where(kept[..., None], means2d, 0.0)
    conics = torch.where(kept[..., None], conics, 0.0)
    depths = torch.where(kept, depths, 0.0)
    if compensations is not None:
        compensations = torch.where(kept, compensations, 0.0)
    count = len(cameras)
    directions = means[None] - cameras.centers.to(means.dtype)[:, None]  # [C, N, 3]
    colors = spherical_harmonics(sh_degree, directions, coefficients[None].expand(count, -1, -1, -1))
    colors = (colors + 0.5).clamp_min(0.0)
    radii = torch.where(kept, radii.amax(dim=-1), 0).to(torch.int32)
    return Projected(means2d, conics, depths, radii, compensations), colors

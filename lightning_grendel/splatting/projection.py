"""EWA splatting of 3-D Gaussians onto pinhole images (the maths of Inria 3DGS / gsplat)."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lightning_grendel.splatting.cameras import Cameras

NEAR_PLANE = 0.01
LOW_PASS = 0.3  # added to the 2-D covariance so that every splat covers about a pixel
FOV_CLAMP_MARGIN = 0.3  # the Jacobian is evaluated no further than 1.3 x tan(fov/2) off-axis

RasterizeMode = Literal["classic", "antialiased"]


def check_rasterize_mode(rasterize_mode: str) -> None:
    """A ``ValueError`` naming the choices unless ``rasterize_mode`` is one of them."""
    if rasterize_mode not in ("classic", "antialiased"):
        raise ValueError(f"rasterize_mode must be 'classic' or 'antialiased', got {rasterize_mode!r}")


class Projected(NamedTuple):
    """Per (camera, Gaussian) 2-D splats. ``radii == 0`` marks culled pairs."""

    means2d: Tensor  # [C, N, 2] pixels, pixel centres at (x + 0.5, y + 0.5)
    conics: Tensor  # [C, N, 3] upper triangle (a, b, c) of the inverse 2-D covariance
    depths: Tensor  # [C, N] camera-space z
    radii: Tensor  # [C, N] int32 pixel radius of the 3-sigma box
    compensations: Tensor | None = None  # [C, N] opacity factor in "antialiased" mode


def quaternion_to_rotation(quats: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] from (w, x, y, z) quaternions of any non-zero norm."""
    w, x, y, z = (quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*quats.shape[:-1], 3, 3)


def covariance_3d(quats: Tensor, scales: Tensor) -> Tensor:
    """World-space covariance ``R S Sᵀ Rᵀ`` [N, 3, 3] from quaternions and (activated) scales."""
    m = quaternion_to_rotation(quats) * scales[..., None, :]
    return m @ m.transpose(-1, -2)


def project_gaussians(
    means: Tensor, quats: Tensor, scales: Tensor, cameras: Cameras, rasterize_mode: RasterizeMode = "classic"
) -> Projected:
    """Project N Gaussians onto every camera of the batch.

    Culls pairs with depth <= 0.01 or whose 3-sigma box misses the image (radius 0); their other
    outputs are finite but meaningless. Both modes add the 0.3 px² low-pass to the 2-D covariance;
    ``antialiased`` (Mip-Splatting's 2-D filter, gsplat's ``rasterize_mode="antialiased"``) also returns
    ``compensations`` = sqrt(det Σ / det(Σ + 0.3 I)), the factor on opacity that keeps each splat's
    integrated weight when the filter widens it, so small or distant splats do not bloat.
    """
    check_rasterize_mode(rasterize_mode)
    viewmats = cameras.world_to_camera.to(means.dtype)
    intrinsics = cameras.intrinsics.to(means.dtype)
    rotation, translation = viewmats[:, None, :3, :3], viewmats[:, None, :3, 3]
    points = (rotation @ means[None, :, :, None])[..., 0] + translation  # [C, N, 3]
    depth = points[..., 2]
    in_front = depth > NEAR_PLANE
    safe_depth = torch.where(in_front, depth, torch.ones_like(depth))

    fx, fy = intrinsics[:, 0, 0, None], intrinsics[:, 1, 1, None]
    cx, cy = intrinsics[:, 0, 2, None], intrinsics[:, 1, 2, None]
    width, height = cameras.width, cameras.height
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos, lim_x_neg = (width - cx) / fx + FOV_CLAMP_MARGIN * tan_x, cx / fx + FOV_CLAMP_MARGIN * tan_x
    lim_y_pos, lim_y_neg = (height - cy) / fy + FOV_CLAMP_MARGIN * tan_y, cy / fy + FOV_CLAMP_MARGIN * tan_y
    tx = safe_depth * torch.minimum(torch.maximum(points[..., 0] / safe_depth, -lim_x_neg), lim_x_pos)
    ty = safe_depth * torch.minimum(torch.maximum(points[..., 1] / safe_depth, -lim_y_neg), lim_y_pos)

    zeros = torch.zeros_like(safe_depth)
    jacobian = torch.stack(
        [
            fx / safe_depth, zeros, -fx * tx / safe_depth**2,
            zeros, fy / safe_depth, -fy * ty / safe_depth**2,
        ],
        dim=-1,
    ).reshape(*safe_depth.shape, 2, 3)
    cov_camera = rotation @ covariance_3d(quats, scales)[None] @ rotation.transpose(-1, -2)
    cov2d = jacobian @ cov_camera @ jacobian.transpose(-1, -2)
    a = cov2d[..., 0, 0] + LOW_PASS
    b = cov2d[..., 0, 1]
    c = cov2d[..., 1, 1] + LOW_PASS
    det = (a * c - b * b).clamp_min(1e-12)
    compensations = None
    if rasterize_mode == "antialiased":
        det_unfiltered = cov2d[..., 0, 0] * cov2d[..., 1, 1] - b * b
        compensations = (det_unfiltered / det).clamp_min(0.0).sqrt()
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)

    means2d = torch.stack(
        [fx * points[..., 0] / safe_depth + cx, fy * points[..., 1] / safe_depth + cy], dim=-1
    )
    with torch.no_grad():
        mid = 0.5 * (a + c)
        lambda_max = mid + (mid * mid - det).clamp_min(0.1).sqrt()
        radii = torch.ceil(3.0 * lambda_max.sqrt())
        on_image = (
            (means2d[..., 0] + radii > 0)
            & (means2d[..., 0] - radii < width)
            & (means2d[..., 1] + radii > 0)
            & (means2d[..., 1] - radii < height)
        )
        radii = torch.where(in_front & on_image, radii, torch.zeros_like(radii)).to(torch.int32)
    return Projected(means2d, conics, depth, radii, compensations)

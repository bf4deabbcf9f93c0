"""Camera paths for novel-view videos: an orbit around the scene centre the training cameras look at."""

from __future__ import annotations

import math

import torch

from lightning_grendel.splatting.cameras import Cameras, look_at_world_to_camera


def look_at_centre(cameras: Cameras) -> torch.Tensor:
    """The point closest (least squares) to every camera's optical axis: what the capture looks at."""
    rotation = cameras.world_to_camera[:, :3, :3].to(torch.float64)
    axes = rotation[:, 2]  # camera z (forward) in world coordinates
    centres = cameras.centers.to(torch.float64)
    projector = torch.eye(3, dtype=torch.float64) - axes[:, :, None] * axes[:, None, :]
    system, rhs = projector.sum(0), (projector @ centres[..., None]).sum(0)[:, 0]
    if len(cameras) < 2 or torch.linalg.matrix_rank(system) < 3:
        return centres.mean(0) + axes.mean(0)
    return torch.linalg.solve(system, rhs)


def orbit_path(cameras: Cameras, frames: int, width: int | None = None) -> Cameras:
    """``frames`` cameras circling the look-at centre at the training cameras' mean radius and height.

    Up is the training cameras' mean up vector (COLMAP scenes are not z-up); intrinsics are the first
    camera's, scaled to ``width`` pixels when given.
    """
    if frames < 1:
        raise ValueError(f"orbit_path: frames must be >= 1, got {frames}")
    centre = look_at_centre(cameras)
    up = -cameras.world_to_camera[:, 1, :3].to(torch.float64).mean(0)  # image y points down
    up = up / up.norm().clamp_min(1e-12)
    offsets = cameras.centers.to(torch.float64) - centre
    height = (offsets @ up).mean()
    radial = offsets - (offsets @ up)[:, None] * up
    radius = radial.norm(dim=1).mean().clamp_min(1e-6)
    first = radial[0] / radial[0].norm().clamp_min(1e-12) if radial[0].norm() > 1e-9 else _any_perpendicular(up)
    second = torch.linalg.cross(up, first)
    eyes = torch.stack([
        centre + height * up + radius * (math.cos(a) * first + math.sin(a) * second)
        for a in (2 * math.pi * i / frames for i in range(frames))
    ])
    world_to_camera = look_at_world_to_camera(eyes, centre, up).to(torch.float32)
    intrinsics = cameras.intrinsics[:1].clone()
    size = (cameras.width, cameras.height)
    if width is not None and width != cameras.width:
        size = (width, max(1, round(cameras.height * width / cameras.width)))
        intrinsics[:, 0] *= size[0] / cameras.width
        intrinsics[:, 1] *= size[1] / cameras.height
    return Cameras(world_to_camera, intrinsics.expand(frames, 3, 3).clone(), size[0], size[1])


def _any_perpendicular(vector: torch.Tensor) -> torch.Tensor:
    other = torch.tensor([1.0, 0.0, 0.0], dtype=vector.dtype)
    if abs(float(vector @ other)) > 0.9:
        other = torch.tensor([0.0, 1.0, 0.0], dtype=vector.dtype)
    result = torch.linalg.cross(vector, other)
    return result / result.norm()

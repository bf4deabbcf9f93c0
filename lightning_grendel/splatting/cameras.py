"""Pinhole cameras in OpenCV axes (x right, y down, z forward), batched, all of one image size."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def focal_from_fov(fov: float, pixels: int) -> float:
    """Focal length in pixels of a pinhole whose full field of view over ``pixels`` is ``fov`` radians."""
    return 0.5 * pixels / math.tan(0.5 * fov)


def intrinsics_matrix(fx: float, fy: float, cx: float, cy: float) -> Tensor:
    """3x3 pinhole matrix; pixel centres are at (x + 0.5, y + 0.5), so cx = W/2 is the image centre."""
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=torch.float32)


def look_at_world_to_camera(eyes: Tensor, target: Tensor, up: Tensor | None = None) -> Tensor:
    """OpenCV world-to-camera matrices [..., 4, 4] of cameras at ``eyes`` [..., 3] looking at ``target``.

    Image y points down, so ``up`` (default +z) appears at the top of the image.
    """
    up = torch.tensor([0.0, 0.0, 1.0]) if up is None else up
    forward = target.to(eyes.dtype) - eyes
    forward = forward / forward.norm(dim=-1, keepdim=True)
    right = torch.linalg.cross(forward, up.to(eyes.dtype).expand_as(forward))
    right = right / right.norm(dim=-1, keepdim=True)
    down = torch.linalg.cross(forward, right)
    rotation = torch.stack([right, down, forward], dim=-2)
    world_to_camera = torch.eye(4, dtype=eyes.dtype).expand(*eyes.shape[:-1], 4, 4).clone()
    world_to_camera[..., :3, :3] = rotation
    world_to_camera[..., :3, 3] = -(rotation @ eyes[..., None])[..., 0]
    return world_to_camera


def opengl_to_opencv_world_to_camera(camera_to_world_gl: Tensor) -> Tensor:
    """World-to-camera (OpenCV axes) from a Blender/OpenGL camera-to-world matrix (y up, looks along -z)."""
    c2w = camera_to_world_gl.clone().to(torch.float64)
    c2w[..., :3, 1:3] *= -1
    return torch.linalg.inv(c2w).to(torch.float32)


@dataclass
class Cameras:
    """A batch of C pinhole cameras sharing one image size.

    ``world_to_camera`` is [C, 4, 4] (x_cam = R x_world + t), ``intrinsics`` is [C, 3, 3]; ``ids`` [C]
    optionally names each camera (its dataset index), so per-camera statistics can follow it.
    """

    world_to_camera: Tensor
    intrinsics: Tensor
    width: int
    height: int
    ids: Tensor | None = None

    def __post_init__(self) -> None:
        if self.world_to_camera.dim() == 2:
            self.world_to_camera = self.world_to_camera[None]
        if self.intrinsics.dim() == 2:
            self.intrinsics = self.intrinsics[None]
        if self.world_to_camera.shape[-2:] != (4, 4) or self.intrinsics.shape[-2:] != (3, 3):
            raise ValueError(
                f"Cameras: world_to_camera must be [C,4,4] and intrinsics [C,3,3], got "
                f"{tuple(self.world_to_camera.shape)} and {tuple(self.intrinsics.shape)}"
            )
        if self.world_to_camera.shape[0] != self.intrinsics.shape[0]:
            raise ValueError("Cameras: world_to_camera and intrinsics hold different numbers of cameras")

    def __len__(self) -> int:
        return self.world_to_camera.shape[0]

    def __getitem__(self, index: int | slice | Tensor) -> Cameras:
        if isinstance(index, int):
            index = slice(index, index + 1)
        ids = None if self.ids is None else self.ids[index]
        return Cameras(self.world_to_camera[index], self.intrinsics[index], self.width, self.height, ids)

    def to(self, device: torch.device | str) -> Cameras:
        return Cameras(
            self.world_to_camera.to(device), self.intrinsics.to(device), self.width, self.height, self.ids
        )

    @property
    def centers(self) -> Tensor:
        """Camera centres in world coordinates, [C, 3]."""
        rotation = self.world_to_camera[:, :3, :3]
        translation = self.world_to_camera[:, :3, 3]
        return -(rotation.transpose(1, 2) @ translation[..., None])[..., 0]


def scene_extent(cameras: Cameras) -> float:
    """3DGS scene extent: 1.1 x the largest distance of a camera centre from their mean."""
    centers = cameras.centers
    radius = (centers - centers.mean(0)).norm(dim=1).max().item()
    return 1.1 * max(radius, 1e-6)

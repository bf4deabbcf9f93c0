"""A random scene of small Gaussians seen by an orbit of cameras, with random targets: enough pixels that
disagree for absolute and signed view-space gradients to differ, small enough for gloo ranks on a CPU."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_grendel.splatting.cameras import Cameras
from tests.helpers.scenes import orbit_cameras, random_gaussians


def small_gaussian_scene(
    count: int, views: int, width: int, height: int, seed: int
) -> tuple[dict[str, Tensor], Cameras, Tensor]:
    """(raw Gaussians of SH degree 1, ``views`` cameras with ids, random target images [V, H, W, 3])."""
    raw = random_gaussians(count, seed=seed, sh_degree=1)
    raw["scales"] = raw["scales"] - 0.5  # smaller than the helper's default: more Gaussians, fewer pixels each
    cameras = orbit_cameras(views, width, height)
    cameras.ids = torch.arange(views)
    targets = torch.rand(views, height, width, 3, generator=torch.Generator().manual_seed(seed + 2))
    return raw, cameras, targets

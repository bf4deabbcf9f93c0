"""Small random scenes shared by the splatting tests (and the C++ backend parity tests)."""

from __future__ import annotations

import math

import torch

from lightning_grendel.splatting.cameras import Cameras, focal_from_fov, intrinsics_matrix, look_at_world_to_camera
from lightning_grendel.splatting.projection import project_gaussians


def orbit_cameras(count: int, width: int, height: int, radius: float = 4.0, fov: float = 0.8) -> Cameras:
    matrices = []
    for i in range(count):
        angle = 2 * math.pi * i / max(count, 1)
        eye = torch.tensor([radius * math.cos(angle), radius * math.sin(angle), 1.5])
        matrices.append(look_at_world_to_camera(eye, torch.zeros(3)))
    focal = focal_from_fov(fov, width)
    intrinsics = intrinsics_matrix(focal, focal, width / 2, height / 2)
    return Cameras(torch.stack(matrices), intrinsics.expand(count, 3, 3).clone(), width, height)


def random_gaussians(count: int, seed: int = 0, dtype: torch.dtype = torch.float32, sh_degree: int = 3) -> dict:
    generator = torch.Generator().manual_seed(seed)
    k = (sh_degree + 1) ** 2
    return {
        "means": (torch.rand(count, 3, generator=generator) * 2 - 1).to(dtype),
        "scales": (torch.rand(count, 3, generator=generator) * 1.5 - 3.5).to(dtype),
        "quats": torch.randn(count, 4, generator=generator).to(dtype),
        "opacities": (torch.randn(count, generator=generator)).to(dtype),
        "sh0": (torch.randn(count, 1, 3, generator=generator) * 0.5).to(dtype),
        "shN": (torch.randn(count, k - 1, 3, generator=generator) * 0.1).to(dtype),
    }


def projected_splats(count: int, width: int, height: int, seed: int = 0) -> dict:
    """Splats of one camera ready for ``rasterize``: random colours, opacities in (0, 1)."""
    gaussians = random_gaussians(count, seed)
    cameras = orbit_cameras(1, width, height)
    proj = project_gaussians(gaussians["means"], gaussians["quats"], gaussians["scales"].exp(), cameras)
    generator = torch.Generator().manual_seed(seed + 1)
    return {
        "means2d": proj.means2d[0],
        "conics": proj.conics[0],
        "colors": torch.rand(count, 3, generator=generator),
        "opacities": torch.sigmoid(gaussians["opacities"]),
        "depths": proj.depths[0],
        "radii": proj.radii[0],
    }

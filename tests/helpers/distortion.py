"""Ground truth for camera-model tests: pinhole renders of a smooth scene, resampled through lens models
written here in NumPy (no OpenCV), as the images a distorted camera would take.

``distorted_image`` renders the scene with a supersampled, wider pinhole camera and samples it where the
distorted camera's pixels look (the forward model inverted per pixel by Newton's method).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lightning_grendel.splatting.cameras import Cameras, look_at_world_to_camera
from lightning_grendel.splatting.render import SingleProcessRenderer

WIDTH, HEIGHT, FOCAL = 80, 60, 64.0
CX, CY = 40.7, 29.6  # off-centre, so a half-pixel convention slip shows
SUPERSAMPLE, MARGIN = 3, 1.8  # reference render: 3x the pixels, 1.8x the field of view
MIN_PSNR, MAX_ERROR = 38.0, 0.12  # undistorted vs pinhole render, on [0, 1] images (uint8 PNGs in between)


def smooth_scene(count: int = 300, seed: int = 3) -> dict[str, torch.Tensor]:
    """Large, soft Gaussians (a few pixels wide), so bilinear resampling is close to exact."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "means": torch.rand(count, 3, generator=generator) * 5.0 - 2.5,
        "scales": torch.log(torch.rand(count, 3, generator=generator) * 0.08 + 0.1),
        "quats": torch.randn(count, 4, generator=generator),
        "opacities": torch.randn(count, generator=generator) + 1.0,
        "sh0": torch.randn(count, 1, 3, generator=generator) * 1.5,
        "shN": torch.zeros(count, 0, 3),
    }


def poses() -> list[torch.Tensor]:
    eyes = [torch.tensor([4.0 * math.cos(a), 4.0 * math.sin(a), 1.2]) for a in (0.3, 1.9)]
    return [look_at_world_to_camera(eye, torch.zeros(3)) for eye in eyes]


def render(scene: dict, world_to_camera: torch.Tensor, k: torch.Tensor, width: int, height: int) -> np.ndarray:
    cameras = Cameras(world_to_camera[None].float(), k[None].float(), width, height)
    image = SingleProcessRenderer("torch")(scene, cameras, 0, torch.full((3,), 0.3)).views[0].image
    return image.clamp(0, 1).numpy().astype(np.float64)


def forward_distort(model: str, coefficients: list[float], x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """COLMAP's camera models, from undistorted to distorted normalised coordinates; ``NERFSTUDIO`` is
    nerfstudio's perspective model (k1, k2, k3, k4, p1, p2: radial 1 + k1 r^2 + k2 r^4 + k3 r^6 + k4 r^8)."""
    if model == "NERFSTUDIO":
        k1, k2, k3, k4, p1, p2 = coefficients
        r2 = x * x + y * y
        radial = 1 + r2 * (k1 + r2 * (k2 + r2 * (k3 + r2 * k4)))
        return x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x), y * radial + 2 * p2 * x * y + p1 * (r2 + 2 * y * y)
    if model.endswith("FISHEYE"):  # SIMPLE_RADIAL_FISHEYE: k1; RADIAL_FISHEYE: k1 k2; OPENCV_FISHEYE: k1..k4
        k1, k2, k3, k4 = [*coefficients, 0.0, 0.0, 0.0][:4]
        r = np.hypot(x, y)
        theta = np.arctan(r)
        theta_d = theta * (1 + k1 * theta**2 + k2 * theta**4 + k3 * theta**6 + k4 * theta**8)
        scale = np.where(r > 1e-12, theta_d / np.maximum(r, 1e-12), 1.0)
        return x * scale, y * scale
    k = dict(zip(["k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6"], [0.0] * 8, strict=True))
    names = {"SIMPLE_RADIAL": ["k1"], "RADIAL": ["k1", "k2"], "OPENCV": ["k1", "k2", "p1", "p2"],
             "FULL_OPENCV": ["k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6"]}[model]
    k.update(zip(names, coefficients, strict=True))
    r2 = x * x + y * y
    numerator = 1 + k["k1"] * r2 + k["k2"] * r2**2 + k["k3"] * r2**3
    radial = numerator / (1 + k["k4"] * r2 + k["k5"] * r2**2 + k["k6"] * r2**3)
    xd = x * radial + 2 * k["p1"] * x * y + k["p2"] * (r2 + 2 * x * x)
    yd = y * radial + k["p1"] * (r2 + 2 * y * y) + 2 * k["p2"] * x * y
    return xd, yd


def undistort_points(model: str, coefficients: list[float], xd: np.ndarray, yd: np.ndarray) -> tuple[np.ndarray, ...]:
    """Invert ``forward_distort`` by Newton's method (finite-difference Jacobian); checked to converge."""
    x, y, h = xd.copy(), yd.copy(), 1e-6
    for _ in range(30):
        fx, fy = forward_distort(model, coefficients, x, y)
        ax, ay = (np.subtract(*pair) / (2 * h) for pair in zip(forward_distort(model, coefficients, x + h, y),
                                                                  forward_distort(model, coefficients, x - h, y),
                                                                  strict=True))
        bx, by = (np.subtract(*pair) / (2 * h) for pair in zip(forward_distort(model, coefficients, x, y + h),
                                                                  forward_distort(model, coefficients, x, y - h),
                                                                  strict=True))
        rx, ry, det = xd - fx, yd - fy, ax * by - bx * ay
        x, y = x + (by * rx - bx * ry) / det, y + (ax * ry - ay * rx) / det
    fx, fy = forward_distort(model, coefficients, x, y)
    assert np.abs(fx - xd).max() < 1e-9 and np.abs(fy - yd).max() < 1e-9
    return x, y


def bilinear(image: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sample [H, W, 3] at continuous pixel coordinates with centres at +0.5 (must be inside)."""
    px, py = u - 0.5, v - 0.5
    assert px.min() >= 0 and py.min() >= 0 and px.max() <= image.shape[1] - 1 and py.max() <= image.shape[0] - 1
    x0 = np.minimum(np.floor(px).astype(int), image.shape[1] - 2)
    y0 = np.minimum(np.floor(py).astype(int), image.shape[0] - 2)
    ax, ay = (px - x0)[..., None], (py - y0)[..., None]
    top = image[y0, x0] * (1 - ax) + image[y0, x0 + 1] * ax
    bottom = image[y0 + 1, x0] * (1 - ax) + image[y0 + 1, x0 + 1] * ax
    return top * (1 - ay) + bottom * ay


def distorted_image(scene: dict, pose: torch.Tensor, model: str, coefficients: list[float],
                    intrinsics: tuple[float, float, float, float] = (FOCAL, FOCAL, CX, CY),
                    size: tuple[int, int] = (WIDTH, HEIGHT)) -> np.ndarray:
    """What the distorted camera (fx, fy, cx, cy, coefficients) sees, from a supersampled pinhole render."""
    fx, fy, cx, cy = intrinsics
    width, height = int(size[0] * MARGIN * SUPERSAMPLE), int(size[1] * MARGIN * SUPERSAMPLE)
    focal = max(fx, fy) * SUPERSAMPLE
    k = torch.tensor([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1.0]])
    reference = render(scene, pose, k, width, height)
    u, v = np.meshgrid(np.arange(size[0]) + 0.5, np.arange(size[1]) + 0.5)
    x, y = undistort_points(model, coefficients, (u - cx) / fx, (v - cy) / fy)
    return bilinear(reference, x * focal + width / 2, y * focal + height / 2)


def quaternion_wxyz(rotation: np.ndarray) -> list[float]:
    w = math.sqrt(max(1e-12, 1 + rotation[0, 0] + rotation[1, 1] + rotation[2, 2])) / 2
    return [w, (rotation[2, 1] - rotation[1, 2]) / (4 * w), (rotation[0, 2] - rotation[2, 0]) / (4 * w),
            (rotation[1, 0] - rotation[0, 1]) / (4 * w)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))



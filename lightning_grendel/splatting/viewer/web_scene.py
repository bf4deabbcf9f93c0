"""What the browser viewer is sent: Gaussians as centres, covariances, colours and opacities, and cameras
as poses and fields of view, computed from the module's raw parameters and OpenCV cameras.

No viewer library is imported here, so the conversions are tested on their own. The web renderer
draws one colour per Gaussian, so colours are the SH DC term (view-independent base colour); the
covariance is ``R S Sᵀ Rᵀ``, the one the rasterizer projects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lightning_grendel.splatting.cameras import Cameras
from lightning_grendel.splatting.projection import quaternion_to_rotation
from lightning_grendel.splatting.sh import SH_C0
from lightning_grendel.splatting.viewer.camera_paths import rotation_to_quaternion

FLOAT16_MAX = 65504.0  # the web renderer stores covariances as float16


@dataclass
class WebGaussians:
    """Arrays for the web renderer; ``scale`` is the factor the scene was divided by so that every
    covariance fits float16 (the renderer's node scale multiplies it back)."""

    centers: np.ndarray  # [N, 3] float32
    covariances: np.ndarray  # [N, 3, 3] float32
    rgbs: np.ndarray  # [N, 3] float32 in [0, 1]
    opacities: np.ndarray  # [N, 1] float32 in [0, 1]
    scale: float = 1.0


@dataclass
class WebCamera:
    """A camera as the web viewer places it: camera-to-world rotation (wxyz) and centre, vertical field of
    view (radians) and width / height; OpenCV axes (x right, y down, z forward), as viewer frustums use."""

    wxyz: np.ndarray
    position: np.ndarray
    fov: float
    aspect: float

    @property
    def forward(self) -> np.ndarray:
        return _rotation(self.wxyz)[:, 2]

    @property
    def up(self) -> np.ndarray:
        return -_rotation(self.wxyz)[:, 1]


def _rotation(wxyz: np.ndarray) -> np.ndarray:
    return quaternion_to_rotation(torch.as_tensor(wxyz, dtype=torch.float64)).numpy()


def covariances_of(quats: np.ndarray, log_scales: np.ndarray) -> np.ndarray:
    """``R S Sᵀ Rᵀ`` [N, 3, 3] from wxyz quaternions of any norm and log-scales, in NumPy (float32 is plenty
    for a page that keeps 16 bits; torch's element-wise stacking of the rotation is far slower here)."""
    norm = np.linalg.norm(quats, axis=1, keepdims=True)
    w, x, y, z = (quats / np.maximum(norm, 1e-12)).T
    rotation = np.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], axis=1).reshape(-1, 3, 3)
    scaled = rotation * np.exp(log_scales)[:, None, :]
    return np.matmul(scaled, scaled.transpose(0, 2, 1))


def salient(opacities: np.ndarray, log_scales: np.ndarray, limit: int) -> np.ndarray:
    """Indices (ascending) of the ``limit`` Gaussians that weigh most in a picture: opacity times the area of
    the largest cross-section (the two largest scales), which bounds the screen area a splat covers from
    any side. All indices when there are no more than ``limit``; ties go to the lower index."""
    count = len(opacities)
    if count <= limit:
        return np.arange(count)
    largest_two = np.sort(log_scales, axis=1)[:, 1:].sum(axis=1)
    log_weight = largest_two - np.logaddexp(0.0, -opacities.reshape(-1))  # log(sigmoid(o) * s_b * s_c)
    order = np.argsort(-log_weight, kind="stable")
    return np.sort(order[:limit])


def web_gaussians(params: dict[str, Tensor], limit: int | None = None) -> WebGaussians:
    """Raw Gaussian parameters (any device) to what the web renderer draws; with ``limit``, only the
    ``limit`` most salient of them (:func:`salient`), so a large scene costs the page a bounded amount."""
    arrays = {key: params[key].detach().to("cpu", torch.float32).numpy()
              for key in ("means", "scales", "quats", "opacities", "sh0")}
    if limit is not None:
        keep = salient(arrays["opacities"], arrays["scales"], limit)
        if len(keep) < len(arrays["means"]):
            arrays = {key: value[keep] for key, value in arrays.items()}
    covariances = covariances_of(arrays["quats"], arrays["scales"])
    rgbs = np.clip(0.5 + np.float32(SH_C0) * arrays["sh0"][:, 0], 0.0, 1.0)
    opacities = (1.0 / (1.0 + np.exp(-arrays["opacities"])))[:, None]
    largest = float(np.abs(covariances).max()) if covariances.size else 0.0
    scale = 1.0
    if math.isfinite(largest) and largest > FLOAT16_MAX / 4:  # divide by a power of two: exact in float32
        scale = 2.0 ** math.ceil(0.5 * math.log2(4 * largest / FLOAT16_MAX))
    return WebGaussians(centers=arrays["means"] / np.float32(scale), covariances=covariances / np.float32(scale**2),
                        rgbs=rgbs, opacities=opacities.astype(np.float32), scale=scale)


def vertical_fov(focal_y: float, height: int) -> float:
    """Vertical field of view (radians) of a pinhole with focal length ``focal_y`` pixels over ``height``."""
    return 2.0 * math.atan(0.5 * height / focal_y)


def web_cameras(cameras: Cameras) -> list[WebCamera]:
    """The cameras' centres, camera-to-world rotations and fields of view."""
    world_to_camera = cameras.world_to_camera.detach().to("cpu", torch.float64)
    rotation = world_to_camera[:, :3, :3].transpose(1, 2)  # camera-to-world
    centres = -(rotation @ world_to_camera[:, :3, 3:])[..., 0]
    quats = rotation_to_quaternion(rotation)
    focal_y = cameras.intrinsics[:, 1, 1].detach().to("cpu", torch.float64)
    return [WebCamera(quats[i].numpy(), centres[i].numpy(), vertical_fov(float(focal_y[i]), cameras.height),
                      cameras.width / cameras.height) for i in range(len(cameras))]


def scene_up(cameras: list[WebCamera]) -> np.ndarray:
    """The cameras' mean up direction (unit), the axis the viewer's orbit controls turn about."""
    up = np.mean([camera.up for camera in cameras], axis=0)
    norm = np.linalg.norm(up)
    return up / norm if norm > 1e-6 else np.array([0.0, 0.0, 1.0])


def overview_camera(centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position, look-at) of a camera that sees most Gaussians: it looks at their median from outside the
    sphere holding 90% of them, for files that come without cameras."""
    if len(centers) == 0:
        return np.array([3.0, 3.0, 3.0]), np.zeros(3)
    middle = np.median(centers, axis=0)
    radius = float(np.quantile(np.linalg.norm(centers - middle, axis=1), 0.9)) or 1.0
    return middle + 2.5 * radius * np.ones(3) / math.sqrt(3.0), middle

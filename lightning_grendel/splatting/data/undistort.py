"""Load-time undistortion of COLMAP cameras with lens distortion, so phone and DSLR captures splat as pinholes.

The rasterizer only knows pinhole cameras. A camera of model SIMPLE_RADIAL, RADIAL, OPENCV, FULL_OPENCV,
OPENCV_FISHEYE, SIMPLE_RADIAL_FISHEYE or RADIAL_FISHEYE is resampled once per camera into a pinhole image
with OpenCV (``initUndistortRectifyMap`` and ``remap``; ``cv2.fisheye`` for the fisheye models: COLMAP's
two radial fisheyes are its OPENCV_FISHEYE with the higher coefficients zero, theta_d = theta (1 + k1
theta^2 + k2 theta^4)), then cropped to the largest rectangle whose every
pixel comes from inside the source image, and its intrinsics follow the crop. The maps are built once
per camera and the scene keeps the decoded result in memory, so no epoch redoes the work; an
:class:`~.image_cache.DecodedImageCache` keeps it on disk for the next run.

Conventions: COLMAP and the rasterizer put pixel centres at ``(x + 0.5, y + 0.5)``, OpenCV at integers,
so the principal point moves by half a pixel on the way into OpenCV and back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lightning_grendel.splatting.data.image_cache import DecodedImageCache
from lightning_grendel.splatting.data.scene import load_image

PINHOLE_MODELS = ("SIMPLE_PINHOLE", "PINHOLE")
DISTORTED_MODELS = ("SIMPLE_RADIAL", "RADIAL", "OPENCV", "FULL_OPENCV", "OPENCV_FISHEYE", "SIMPLE_RADIAL_FISHEYE",
                    "RADIAL_FISHEYE")
FISHEYE_MODELS = ("OPENCV_FISHEYE", "SIMPLE_RADIAL_FISHEYE", "RADIAL_FISHEYE")
SUPPORTED_MODELS = PINHOLE_MODELS + DISTORTED_MODELS
# COLMAP parameter order -> (fx, fy, cx, cy) indices (fy = fx for one focal) and the distortion slice.
_LAYOUT: dict[str, tuple[tuple[int, int, int, int], slice]] = {
    "SIMPLE_PINHOLE": ((0, 0, 1, 2), slice(3, 3)),
    "PINHOLE": ((0, 1, 2, 3), slice(4, 4)),
    "SIMPLE_RADIAL": ((0, 0, 1, 2), slice(3, 4)),  # k1
    "RADIAL": ((0, 0, 1, 2), slice(3, 5)),  # k1 k2
    "OPENCV": ((0, 1, 2, 3), slice(4, 8)),  # k1 k2 p1 p2
    "FULL_OPENCV": ((0, 1, 2, 3), slice(4, 12)),  # k1 k2 p1 p2 k3 k4 k5 k6 (OpenCV's rational model)
    "OPENCV_FISHEYE": ((0, 1, 2, 3), slice(4, 8)),  # k1 k2 k3 k4 of theta
    "SIMPLE_RADIAL_FISHEYE": ((0, 0, 1, 2), slice(3, 4)),  # k1 of theta
    "RADIAL_FISHEYE": ((0, 0, 1, 2), slice(3, 5)),  # k1 k2 of theta
}


class CameraLike(Protocol):
    id: int
    model: str
    width: int
    height: int
    params: tuple[float, ...]


@dataclass(frozen=True)
class Lens:
    """Pinhole part (COLMAP pixel convention) and OpenCV distortion coefficients of one camera."""

    fx: float
    fy: float
    cx: float
    cy: float
    coefficients: tuple[float, ...]
    fisheye: bool

    def opencv_matrix(self) -> np.ndarray:
        return np.array([[self.fx, 0, self.cx - 0.5], [0, self.fy, self.cy - 0.5], [0, 0, 1]], np.float64)

    def opencv_coefficients(self) -> np.ndarray:
        """4 values for the fisheye models (k1..k4 of theta), else 4 or 8 in OpenCV's (k1, k2, p1, p2[, k3..k6])
        order."""
        values = list(self.coefficients)
        size = 4 if self.fisheye or len(values) <= 4 else 8
        values = values + [0.0] * (size - len(values))
        return np.array(values, np.float64)

    @property
    def distorted(self) -> bool:
        return any(value != 0.0 for value in self.coefficients)


def camera_lens(camera: CameraLike, where: Path | str) -> Lens:
    """The lens of a COLMAP camera; an unknown model or a wrong parameter count names ``where`` and the camera."""
    if camera.model not in _LAYOUT:
        raise ValueError(
            f"{where}: camera {camera.id} uses the {camera.model} model, which cannot be undistorted here; "
            f"supported: {', '.join(SUPPORTED_MODELS)}"
        )
    (fx, fy, cx, cy), distortion = _LAYOUT[camera.model]
    needed = max(3, distortion.stop)
    if len(camera.params) != needed:
        raise ValueError(
            f"{where}: camera {camera.id} ({camera.model}) needs {needed} parameters, got {len(camera.params)}"
        )
    p = [float(value) for value in camera.params]
    return Lens(p[fx], p[fy], p[cx], p[cy], tuple(p[distortion]), camera.model in FISHEYE_MODELS)


def intrinsics_matrix64(fx: float, fy: float, cx: float, cy: float) -> Tensor:
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=torch.float64)


def valid_rectangle(valid: np.ndarray) -> tuple[int, int, int, int]:
    """(x, y, w, h) of a rectangle holding only ``valid`` pixels: peel the edge with most invalid ones.

    Undistortion's invalid pixels hug the border, so peeling from outside in finds a near-largest one.
    """
    top, bottom, left, right = 0, valid.shape[0], 0, valid.shape[1]
    while top < bottom and left < right:
        block = ~valid[top:bottom, left:right]
        edges = [block[0].sum(), block[-1].sum(), block[:, 0].sum(), block[:, -1].sum()]
        worst = int(np.argmax(edges))
        if edges[worst] == 0:
            return left, top, right - left, bottom - top
        if worst == 0:
            top += 1
        elif worst == 1:
            bottom -= 1
        elif worst == 2:
            left += 1
        else:
            right -= 1
    raise ValueError("undistortion leaves no valid pixel")


@dataclass(frozen=True)
class Undistortion:
    """How one camera's images become pinhole images: remap tables (None for a pinhole) and the new K.

    ``intrinsics`` (float64 3x3, COLMAP pixel convention) and ``size`` describe the output image;
    ``lens`` is the distorted source camera's (None for a pinhole).
    """

    intrinsics: Tensor
    size: tuple[int, int]
    map_x: np.ndarray | None = None
    map_y: np.ndarray | None = None
    lens: Lens | None = None

    def describe(self) -> str:
        """Everything the remap tables follow from (source lens, output K and crop): the cache key's camera."""
        return f"{self.lens!r} K={self.intrinsics.tolist()} size={self.size}"

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The undistorted (and cropped) image; a pinhole image comes back unchanged."""
        if self.map_x is None:
            return image
        return cv2.remap(image, self.map_x, self.map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def cropped(self, width: int, height: int) -> Undistortion:
        """The centred ``width`` x ``height`` part (to share one size with other cameras)."""
        dx, dy = (self.size[0] - width) // 2, (self.size[1] - height) // 2
        intrinsics = self.intrinsics.clone()
        intrinsics[0, 2] -= dx
        intrinsics[1, 2] -= dy
        if (width, height) == self.size:
            return self
        map_x, map_y = self.map_x, self.map_y
        if map_x is None:  # a pinhole camera among undistorted ones: an identity map crops it
            map_x, map_y = (grid.astype(np.float32) for grid in np.meshgrid(*(np.arange(n) for n in self.size)))
        window = (slice(dy, dy + height), slice(dx, dx + width))
        return replace(self, intrinsics=intrinsics, size=(width, height),
                       map_x=map_x[window].copy(), map_y=map_y[window].copy())


def make_undistortion(camera: CameraLike, where: Path | str) -> Undistortion:
    """Remap tables and cropped pinhole intrinsics of one camera (the pinhole K as is when undistorted)."""
    lens = camera_lens(camera, where)
    size = (int(camera.width), int(camera.height))
    if not lens.distorted:
        return Undistortion(intrinsics_matrix64(lens.fx, lens.fy, lens.cx, lens.cy), size)
    matrix, coefficients = lens.opencv_matrix(), lens.opencv_coefficients()
    if lens.fisheye:
        new = cv2.fisheye.estimateNewCameraMatrixForUndistortRectify(matrix, coefficients, size, np.eye(3), balance=0.0)
        map_x, map_y = cv2.fisheye.initUndistortRectifyMap(matrix, coefficients, np.eye(3), new, size, cv2.CV_32FC1)
    else:
        new, _ = cv2.getOptimalNewCameraMatrix(matrix, coefficients, size, 0)
        map_x, map_y = cv2.initUndistortRectifyMap(matrix, coefficients, None, new, size, cv2.CV_32FC1)
    valid = (map_x >= 0) & (map_x <= size[0] - 1) & (map_y >= 0) & (map_y <= size[1] - 1)
    try:
        x, y, w, h = valid_rectangle(valid)
    except ValueError as error:
        raise ValueError(f"{where}: camera {camera.id} ({camera.model}): {error}") from error
    intrinsics = intrinsics_matrix64(new[0, 0], new[1, 1], new[0, 2] + 0.5 - x, new[1, 2] + 0.5 - y)
    window = (slice(y, y + h), slice(x, x + w))
    return Undistortion(intrinsics, (w, h), map_x[window].copy(), map_y[window].copy(), lens)


def make_undistortions(cameras: list[CameraLike], where: Path | str) -> dict[int, Undistortion]:
    """One undistortion per camera id, all cropped to one common size (one dataset, one image size)."""
    undistortions = {camera.id: make_undistortion(camera, where) for camera in cameras}
    width = min(u.size[0] for u in undistortions.values())
    height = min(u.size[1] for u in undistortions.values())
    return {key: u.cropped(width, height) for key, u in undistortions.items()}


def load_undistorted(
    path: Path, undistortion: Undistortion, source_size: tuple[int, int], reference: str, size: tuple[int, int],
    cache: DecodedImageCache | None = None,
) -> np.ndarray:
    """Decode ``path`` (RGB, of ``source_size``), undistort it, and area-resample it to ``size``; with a
    ``cache``, a distorted camera's result is read from (or written to) disk."""
    if undistortion.map_x is None:
        return load_image(path, "RGB", source_size, reference, size)

    def make() -> np.ndarray:
        image = undistortion.apply(load_image(path, "RGB", source_size, reference, source_size))
        if image.shape[1::-1] != size:
            image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX), dtype=np.uint8).copy()
        return image

    return make() if cache is None else cache.image(path, f"{undistortion.describe()} source={source_size}", size, make)

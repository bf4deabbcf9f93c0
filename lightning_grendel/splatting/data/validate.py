"""Camera and point checks for the scene readers: one bad frame is an error naming the file and the frame.

A single NaN pose makes the scene extent, and with it the position learning rate, NaN, and the whole
model is NaN after one step while the loss stays finite (NaN splats are culled). So every reader checks
what it parsed before anything is trained: poses finite and rigid (a rotation, not a reflection, shear or
singular matrix), quaternions of non-zero length, focal lengths positive, fields of view in (0, π),
initial points finite.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

RIGID_TOLERANCE = 1e-3  # |R Rᵀ - I| and |det R - 1|: exported poses are rigid to ~1e-6, shears are not
MIN_QUATERNION_NORM = 1e-8


class CameraDataError(ValueError):
    """A camera or point of a dataset file is non-finite or degenerate."""


def _fail(source: str | Path, frame: str, problem: str) -> CameraDataError:
    return CameraDataError(f"{source}: {frame}: {problem}")


def matrix_from_json(value: object, source: str | Path, frame: str) -> Tensor:
    """A 4x4 float64 tensor from a JSON ``transform_matrix``; anything else (a string, ragged rows) is an error."""
    try:
        matrix = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise _fail(source, frame, f"transform_matrix must be a 4x4 list of numbers, got {value!r:.60}") from error
    if matrix.shape != (4, 4):
        raise _fail(source, frame, f"transform_matrix must be 4x4, got {tuple(matrix.shape)}")
    return matrix


def check_rigid_pose(matrix: Tensor, source: str | Path, frame: str) -> None:
    """``matrix`` [4, 4] (camera-to-world or world-to-camera) is finite, ``[R t; 0 1]`` with R a rotation."""
    matrix = matrix.to(torch.float64)
    if not torch.isfinite(matrix).all():
        raise _fail(source, frame, f"the pose has non-finite entries: {matrix.tolist()}")
    bottom = matrix[3]
    if not torch.allclose(bottom, torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64), atol=RIGID_TOLERANCE):
        raise _fail(source, frame, f"the pose's last row must be [0, 0, 0, 1], got {bottom.tolist()}")
    rotation = matrix[:3, :3]
    det = float(torch.linalg.det(rotation))
    if abs(det) < RIGID_TOLERANCE:
        raise _fail(source, frame, f"the pose's 3x3 part is singular (determinant {det:.3g})")
    off = float((rotation @ rotation.T - torch.eye(3, dtype=torch.float64)).abs().max())
    if off > RIGID_TOLERANCE or abs(det - 1.0) > RIGID_TOLERANCE:
        raise _fail(
            source, frame,
            f"the pose is not rigid (|R Rᵀ - I| = {off:.3g}, det R = {det:.3g}); a camera pose must be a "
            "rotation and a translation, without scale, shear or reflection",
        )


def check_field_of_view(fov: float, source: str | Path, what: str = "camera_angle_x") -> None:
    if not math.isfinite(fov) or not 0.0 < fov < math.pi:
        raise CameraDataError(f"{source}: {what} must be a finite angle in (0, π) radians, got {fov}")


def check_quaternion(qvec: Sequence[float], source: str | Path, frame: str) -> None:
    q = np.asarray(qvec, dtype=np.float64)
    if not np.isfinite(q).all():
        raise _fail(source, frame, f"the rotation quaternion has non-finite entries: {list(qvec)}")
    if np.linalg.norm(q) < MIN_QUATERNION_NORM:
        raise _fail(source, frame, f"the rotation quaternion has zero length: {list(qvec)}")


def check_translation(tvec: Sequence[float], source: str | Path, frame: str) -> None:
    if not np.isfinite(np.asarray(tvec, dtype=np.float64)).all():
        raise _fail(source, frame, f"the translation has non-finite entries: {list(tvec)}")


def focal_count(model: str) -> int:
    """How many leading COLMAP camera parameters are focal lengths (f, or fx and fy)."""
    return 1 if model.startswith("SIMPLE_") or model in ("RADIAL", "RADIAL_FISHEYE") else 2


def check_camera_parameters(model: str, params: Sequence[float], source: str | Path, frame: str) -> None:
    """Every parameter finite and the focal length(s) positive (COLMAP order: focal first)."""
    values = np.asarray(params, dtype=np.float64)
    if not np.isfinite(values).all():
        raise _fail(source, frame, f"{model} parameters must be finite, got {list(params)}")
    focals = values[: focal_count(model)]
    if (focals <= 0).any():
        raise _fail(source, frame, f"{model} focal length(s) must be positive, got {focals.tolist()}")


def check_points(points: np.ndarray | Tensor, source: str | Path, ids: Iterable[int] | None = None) -> None:
    """Initial points [P, 3] are finite; the error counts the bad ones and names the first."""
    array = points.detach().cpu().numpy() if isinstance(points, Tensor) else np.asarray(points)
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        label = f"point {list(ids)[first]}" if ids is not None else f"point row {first}"
        raise CameraDataError(
            f"{source}: {int(bad.sum())} of {len(array)} 3D points have non-finite coordinates "
            f"(first: {label} = {array[first].tolist()})"
        )


def check_colmap_model(cameras: dict, images: dict, points: object, files: dict[str, Path]) -> None:
    """Cameras, image poses and 3D points of a parsed COLMAP model (duck-typed on colmap.py's records)."""
    for camera in cameras.values():
        check_camera_parameters(camera.model, camera.params, files["cameras"], f"camera {camera.id}")
    for image in images.values():
        frame = f"image {image.id} ({image.name})"
        check_quaternion(image.qvec, files["images"], frame)
        check_translation(image.tvec, files["images"], frame)
    check_points(points.xyz, files["points3D"], points.ids.tolist())

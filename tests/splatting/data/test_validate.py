"""The readers refuse non-finite or degenerate cameras and points, naming the file and the frame."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_grendel.splatting.data.blender import load_blender_scene
from lightning_grendel.splatting.data.colmap import read_model
from lightning_grendel.splatting.data.validate import CameraDataError, check_rigid_pose

NAN = float("nan")
# Camera 4 units along +z, rotated by 90 degrees about z: rigid, written out by hand.
GOOD_POSE = [[0.0, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 4.0], [0.0, 0.0, 0.0, 1.0]]


def write_blender(root: Path, matrix: object = GOOD_POSE, fov: float = 0.7) -> Path:
    Image.fromarray(np.zeros((4, 4, 4), np.uint8)).save(root / "r_0.png")
    for split in ("train", "test"):
        frames = [{"file_path": "./r_0", "transform_matrix": GOOD_POSE}, {"file_path": "./r_0",
                                                                             "transform_matrix": matrix}]
        (root / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": fov, "frames": frames}))
    return root / "transforms_train.json"


def test_a_good_blender_scene_loads(tmp_path):
    write_blender(tmp_path)
    assert len(load_blender_scene(tmp_path, num_init_points=10).train) == 2


@pytest.mark.parametrize(
    ("matrix", "fov", "message"),
    [
        ([[NAN, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], 0.7, "non-finite"),
        ([[1, 0, 0, 0], [0, 1, 0, math.inf], [0, 0, 1, 0], [0, 0, 0, 1]], 0.7, "non-finite"),
        ("identity", 0.7, "must be a 4x4 list of numbers"),
        ([[1, 0, 0], [0, 1, 0], [0, 0, 1]], 0.7, "must be 4x4"),
        ([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]], 0.7, "singular"),
        ([[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]], 0.7, "not rigid"),
        ([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 0], [0, 0, 0, 1]], 0.7, "not rigid"),  # a mirror
        ([[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], 0.7, "not rigid"),  # a shear
        ([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], 0.7, "last row"),
    ],
)
def test_bad_blender_frames_name_file_and_frame(tmp_path, matrix, fov, message):
    path = write_blender(tmp_path, matrix, fov)
    with pytest.raises(CameraDataError, match=message) as info:
        load_blender_scene(tmp_path, num_init_points=10)
    assert str(path) in str(info.value) and "frame 1 (./r_0)" in str(info.value)


@pytest.mark.parametrize("fov", [NAN, 0.0, -0.5, 4.0])
def test_bad_blender_field_of_view_names_the_file(tmp_path, fov):
    path = write_blender(tmp_path, fov=fov)
    with pytest.raises(CameraDataError, match="camera_angle_x must be a finite angle") as info:
        load_blender_scene(tmp_path, num_init_points=10)
    assert str(path) in str(info.value)


def test_rigid_pose_tolerance_accepts_float32_round_off():
    pose = torch.tensor(GOOD_POSE, dtype=torch.float32)
    angle = torch.tensor(0.3)
    pose[:2, :2] = torch.tensor([[torch.cos(angle), -torch.sin(angle)], [torch.sin(angle), torch.cos(angle)]])
    check_rigid_pose(pose, "f.json", "frame 0")  # no error


def write_colmap(root: Path, camera: str = "1 PINHOLE 64 48 50 50 32 24", pose: str = "1 0 0 0 0 0 2",
                 point: str = "0.25 0.5 0.75") -> Path:
    (root / "cameras.txt").write_text(camera + "\n")
    (root / "images.txt").write_text(f"1 1 0 0 0 0 0 2 1 a.png\n\n2 {pose} 1 b.png\n\n")
    (root / "points3D.txt").write_text(f"7 1 1 1 10 20 30 0.5\n8 {point} 10 20 30 0.5\n")
    return root


def test_a_good_colmap_model_loads(tmp_path):
    assert len(read_model(write_colmap(tmp_path)).images) == 2


@pytest.mark.parametrize(
    ("kwargs", "file", "where", "message"),
    [
        ({"pose": "nan 0 0 0 0 0 2"}, "images.txt", "image 2 (b.png)", "quaternion has non-finite"),
        ({"pose": "0 0 0 0 0 0 2"}, "images.txt", "image 2 (b.png)", "quaternion has zero length"),
        ({"pose": "1 0 0 0 0 inf 2"}, "images.txt", "image 2 (b.png)", "translation has non-finite"),
        ({"camera": "1 PINHOLE 64 48 0 50 32 24"}, "cameras.txt", "camera 1", "must be positive"),
        ({"camera": "1 SIMPLE_PINHOLE 64 48 -5 32 24"}, "cameras.txt", "camera 1", "must be positive"),
        ({"camera": "1 PINHOLE 64 48 50 50 nan 24"}, "cameras.txt", "camera 1", "must be finite"),
        ({"point": "0.25 nan 0.75"}, "points3D.txt", "point 8", "1 of 2 3D points have non-finite"),
    ],
)
def test_bad_colmap_records_name_file_and_record(tmp_path, kwargs, file, where, message):
    write_colmap(tmp_path, **kwargs)
    with pytest.raises(CameraDataError, match=message) as info:
        read_model(tmp_path)
    assert str(tmp_path / file) in str(info.value) and where in str(info.value)

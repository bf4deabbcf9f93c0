"""Load-time undistortion against ground truth: pinhole renders, distorted by an independent forward model.

Each case renders a smooth procedural scene with a pinhole camera (supersampled, wide enough for every
distorted ray), resamples it into the distorted image a real lens would take (the forward model below,
inverted per pixel by fixed-point iteration, written here without OpenCV), saves a COLMAP text model
with the coefficients, and checks that the loader's undistorted images and intrinsics reproduce a
pinhole render of the same view on the loader's crop. The scene, renderer and lens models are in
``tests/helpers/distortion.py`` (shared with the nerfstudio reader's tests).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_grendel.splatting.data.colmap import ColmapFormatError, UnsupportedCameraModelError, load_colmap_scene
from lightning_grendel.splatting.data.undistort import valid_rectangle
from tests.helpers.distortion import (
    CX,
    CY,
    FOCAL,
    HEIGHT,
    MAX_ERROR,
    MIN_PSNR,
    WIDTH,
    distorted_image,
    poses,
    psnr,
    quaternion_wxyz,
    render,
    smooth_scene,
)


def colmap_params(model: str, coefficients: list[float]) -> list[float]:
    if model in ("SIMPLE_RADIAL", "RADIAL", "SIMPLE_RADIAL_FISHEYE", "RADIAL_FISHEYE"):
        return [FOCAL, CX, CY, *coefficients]
    return [FOCAL, FOCAL, CX, CY, *coefficients]


def write_dataset(root, scene: dict, model: str, coefficients: list[float]) -> list[np.ndarray]:
    """Two images, each with its own camera (coefficients c and 0.6 c): different crops, one common size."""
    (root / "images").mkdir(parents=True)
    (root / "sparse" / "0").mkdir(parents=True)
    cameras, images, distorted = [], [], []
    for index, pose in enumerate(poses()):
        scaled = [c * (1.0 if index == 0 else 0.6) for c in coefficients]
        image = distorted_image(scene, pose, model, scaled)
        distorted.append(image)
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(root / "images" / f"view{index}.png")
        cameras.append(" ".join(map(str, [index + 1, model, WIDTH, HEIGHT, *colmap_params(model, scaled)])))
        m = pose.double().numpy()
        fields = [index + 1, *quaternion_wxyz(m[:3, :3]), *m[:3, 3], index + 1, f"view{index}.png"]
        images.append(" ".join(map(str, fields)))
    (root / "sparse" / "0" / "cameras.txt").write_text("\n".join(cameras) + "\n")
    (root / "sparse" / "0" / "images.txt").write_text("\n\n".join(images) + "\n\n")
    (root / "sparse" / "0" / "points3D.txt").write_text("1 0 0 0 128 128 128 0.5\n")
    return distorted


CASES = {
    "SIMPLE_RADIAL": [-0.15],
    "RADIAL": [-0.2, 0.04],
    "OPENCV": [-0.2, 0.03, 0.006, -0.005],
    "FULL_OPENCV": [0.3, -0.02, 0.004, 0.005, 0.0, 0.05, 0.0, 0.0],
    "OPENCV_FISHEYE": [0.1, -0.03, 0.01, 0.0],
    "SIMPLE_RADIAL_FISHEYE": [0.08],
    "RADIAL_FISHEYE": [0.1, -0.04],
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model", list(CASES))
def test_undistorted_images_reproduce_pinhole_renders(tmp_path, model):
    scene = smooth_scene()
    distorted = write_dataset(tmp_path, scene, model, CASES[model])
    data = load_colmap_scene(tmp_path, test_every=2)
    pose_list = poses()
    for split, index in ((data.test, 0), (data.train, 1)):
        cameras = split.cameras
        assert (cameras.width, cameras.height) == (data.test.cameras.width, data.test.cameras.height)
        assert cameras.width <= WIDTH and cameras.height <= HEIGHT and cameras.width >= 0.8 * WIDTH
        k = cameras.intrinsics[0]
        assert not torch.allclose(k, torch.tensor([[FOCAL, 0, CX], [0, FOCAL, CY], [0, 0, 1.0]]), atol=0.05)
        expected = render(scene, pose_list[index], k, cameras.width, cameras.height)
        loaded = split.images[0].numpy().astype(np.float64) / 255.0
        error = np.abs(loaded - expected)
        assert psnr(loaded, expected) > MIN_PSNR, (model, index, psnr(loaded, expected))
        assert error.max() < MAX_ERROR, (model, index, error.max())
        # The test can fail: the distorted image read as a pinhole is far off the same render.
        naive = distorted[index][: cameras.height, : cameras.width]
        naive_k = torch.tensor([[FOCAL, 0, CX], [0, FOCAL, CY], [0, 0, 1.0]])
        assert psnr(naive, render(scene, pose_list[index], naive_k, cameras.width, cameras.height)) < MIN_PSNR - 6


@pytest.mark.timeout(60)
def test_undistortion_and_resizing_compose(tmp_path):
    scene = smooth_scene()
    write_dataset(tmp_path, scene, "RADIAL", CASES["RADIAL"])
    full = load_colmap_scene(tmp_path, test_every=2)
    width, height = full.test.cameras.width, full.test.cameras.height
    assert width % 2 == 0 and height % 2 == 0
    half = load_colmap_scene(tmp_path, test_every=2, image_width=width // 2)
    assert (half.test.cameras.width, half.test.cameras.height) == (width // 2, height // 2)
    scale = torch.tensor([0.5, 0.5, 1.0])[:, None]
    assert torch.allclose(half.test.cameras.intrinsics[0], full.test.cameras.intrinsics[0] * scale)
    # Area resampling after undistortion: the 2x2 means of the full-size pinhole render.
    expected = render(scene, poses()[0], full.test.cameras.intrinsics[0], width, height)
    expected = expected.reshape(height // 2, 2, width // 2, 2, 3).mean((1, 3))
    assert psnr(half.test.images[0].numpy() / 255.0, expected) > MIN_PSNR


def test_valid_rectangle_peels_invalid_border():
    valid = np.ones((10, 12), bool)
    valid[0, :] = False
    valid[:, 11] = False
    valid[9, 0] = False
    x, y, w, h = valid_rectangle(valid)
    assert valid[y : y + h, x : x + w].all() and w * h >= 10 * 8


def test_unknown_model_names_file_and_camera(tmp_path):
    (tmp_path / "cameras.txt").write_text("7 FOV 640 480 500 500 320 240 0.9\n")
    with pytest.raises(UnsupportedCameraModelError) as info:
        load_colmap_scene(tmp_path)
    message = str(info.value)
    assert "cameras.txt" in message and "camera 7" in message and "FOV" in message
    assert "OPENCV_FISHEYE" in message and "colmap image_undistorter" in message


def test_missing_distortion_parameters_name_file_line_and_camera(tmp_path):
    (tmp_path / "cameras.txt").write_text("# c\n3 OPENCV 640 480 500 500 320 240 0.1 0.01 0.0\n")
    with pytest.raises(ColmapFormatError, match=r"cameras\.txt:2: camera 3 \(OPENCV\) needs 8 parameters, got 7"):
        load_colmap_scene(tmp_path)

"""NeRF-synthetic reader: cameras against the raw JSON, compositing against PIL, and bad-input errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_grendel.splatting.data.blender import load_blender_scene
from lightning_grendel.splatting.data.datamodule import PosedImageDataset


def project(world_to_camera: torch.Tensor, intrinsics: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """Plain pinhole projection (OpenCV axes) of one world point, written independently of the package."""
    cam = world_to_camera[:3, :3].double() @ point.double() + world_to_camera[:3, 3].double()
    assert cam[2] > 0, "point behind the camera"
    k = intrinsics.double()
    return torch.stack([k[0, 0] * cam[0] / cam[2] + k[0, 2], k[1, 1] * cam[1] / cam[2] + k[1, 2]])


@pytest.fixture(scope="module")
def blocks(shared_dataset):
    root = shared_dataset("nerf_synthetic_blocks")
    return root, load_blender_scene(root, image_width=200, num_init_points=1000, seed=3)


def test_shapes_and_intrinsics(blocks):
    _, scene = blocks
    assert (len(scene.train), len(scene.val), len(scene.test)) == (60, 10, 20)
    for split in (scene.train, scene.val, scene.test):
        assert split.images.shape[1:] == (200, 200, 4) and split.images.dtype == torch.uint8
        assert (split.cameras.width, split.cameras.height) == (200, 200)
    # README: fx = fy = 555.5556 px at 400 px wide, principal point at the centre; halved at 200 px.
    k = scene.train.cameras.intrinsics[0]
    assert k[0, 0].item() == pytest.approx(555.5556 / 2, abs=1e-3)
    assert k[1, 1].item() == pytest.approx(555.5556 / 2, abs=1e-3)
    assert (k[0, 2].item(), k[1, 2].item()) == (100.0, 100.0)
    assert scene.points.shape == (1000, 3) and scene.colors.shape == (1000, 3)
    assert scene.points.abs().max() <= 1.3 and 0 <= scene.colors.min() and scene.colors.max() <= 1


def test_origin_projects_to_the_image_centre_for_every_camera(blocks):
    """Every camera of the dataset looks at the world origin (README)."""
    _, scene = blocks
    origin = torch.zeros(3)
    for split in (scene.train, scene.val, scene.test):
        for i in range(len(split)):
            uv = project(split.cameras.world_to_camera[i], split.cameras.intrinsics[i], origin)
            assert torch.allclose(uv, torch.tensor([100.0, 100.0], dtype=torch.float64), atol=0.05), (i, uv)


def test_camera_centres_and_axes_match_the_json(blocks):
    root, scene = blocks
    frames = json.loads((root / "transforms_test.json").read_text())["frames"]
    for i, frame in enumerate(frames):
        c2w = torch.tensor(frame["transform_matrix"], dtype=torch.float64)
        w2c = scene.test.cameras.world_to_camera[i].double()
        assert torch.allclose(scene.test.cameras.centers[i].double(), c2w[:3, 3], atol=1e-4)
        assert torch.allclose(w2c[2, :3], -c2w[:3, 2], atol=1e-5)  # OpenCV forward = OpenGL -z
        assert torch.allclose(w2c[1, :3], -c2w[:3, 1], atol=1e-5)  # OpenCV down = OpenGL -y
        assert c2w[:3, 3].norm().item() == pytest.approx(4.0, abs=1e-3)  # README: radius 4


def _write_tiny_dataset(root, sizes, missing=()):
    rng = np.random.default_rng(0)
    angle = 2 * math.atan(0.5)
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        frames = []
        for i, size in enumerate(sizes):
            name = f"./{split}/r_{i}"
            if name not in missing:
                pixels = rng.integers(0, 256, size=(size[1], size[0], 4), dtype=np.uint8)
                Image.fromarray(pixels, "RGBA").save(root / f"{name}.png")
            c2w = np.eye(4)
            c2w[2, 3] = 3.0 + i
            frames.append({"file_path": name, "transform_matrix": c2w.tolist()})
        (root / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": angle, "frames": frames}))


def test_compositing_matches_an_independent_formula(tmp_path):
    _write_tiny_dataset(tmp_path, [(8, 6), (8, 6)])
    scene = load_blender_scene(tmp_path, num_init_points=10)
    assert len(scene.val) == 2, "test split doubles as val when transforms_val.json is absent"
    # fov = 2 atan(0.5) over 8 px gives fx = 8; principal point at the centre.
    assert torch.equal(scene.train.cameras.intrinsics[0], torch.tensor([[8.0, 0, 4], [0, 8, 3], [0, 0, 1]]))
    for background in ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0.2, 0.5, 0.9)):
        item = PosedImageDataset(scene.train, torch.tensor(background))[1]
        rgba = np.asarray(Image.open(tmp_path / "train" / "r_1.png"), dtype=np.float64) / 255
        expected = rgba[..., :3] * rgba[..., 3:] + np.array(background) * (1 - rgba[..., 3:])
        assert item["image"].dtype == torch.float32 and item["image"].shape == (6, 8, 3)
        np.testing.assert_allclose(item["image"].numpy(), expected, atol=1e-6)


def test_downscale_by_factor_scales_intrinsics(tmp_path):
    _write_tiny_dataset(tmp_path, [(8, 6)])
    scene = load_blender_scene(tmp_path, downscale=2.0, num_init_points=10)
    assert scene.train.images.shape == (1, 3, 4, 4)
    assert torch.equal(scene.train.cameras.intrinsics[0], torch.tensor([[4.0, 0, 2], [0, 4, 1.5], [0, 0, 1]]))


def test_missing_image_names_transforms_file_and_image(tmp_path):
    _write_tiny_dataset(tmp_path, [(8, 6), (8, 6)], missing=("./test/r_1",))
    with pytest.raises(FileNotFoundError) as info:
        load_blender_scene(tmp_path, num_init_points=10)
    message = str(info.value)
    assert "transforms_test.json" in message and "r_1.png" in message


def test_images_of_different_sizes_are_an_error_naming_the_file(tmp_path):
    _write_tiny_dataset(tmp_path, [(8, 6), (8, 7)])
    with pytest.raises(ValueError, match=r"r_1\.png.*8x7"):
        load_blender_scene(tmp_path, num_init_points=10)


def test_initial_points_are_seeded(tmp_path):
    _write_tiny_dataset(tmp_path, [(8, 6)])
    a = load_blender_scene(tmp_path, num_init_points=50, seed=1)
    b = load_blender_scene(tmp_path, num_init_points=50, seed=1)
    c = load_blender_scene(tmp_path, num_init_points=50, seed=2)
    assert torch.equal(a.points, b.points) and torch.equal(a.colors, b.colors)
    assert not torch.equal(a.points, c.points)

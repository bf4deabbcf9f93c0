"""Procedural demo scene: deterministic per seed, non-trivial images, geometry as documented."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_grendel.splatting.data.demo_scene import DOME_RADIUS, LOOK_AT, make_demo_scene, trace


def small_scene(seed: int):
    return make_demo_scene(image_width=24, seed=seed, num_train=5, num_val=2, num_test=3, num_points=300)


@pytest.fixture(scope="module")
def scene():
    return small_scene(0)


def test_deterministic_for_a_seed(scene):
    again, other = small_scene(0), small_scene(1)
    for split in ("train", "val", "test"):
        a, b, c = getattr(scene, split), getattr(again, split), getattr(other, split)
        assert torch.equal(a.images, b.images) and torch.equal(a.cameras.world_to_camera, b.cameras.world_to_camera)
        assert not torch.equal(a.cameras.world_to_camera, c.cameras.world_to_camera)
    assert torch.equal(scene.points, again.points) and torch.equal(scene.colors, again.colors)
    assert not torch.equal(scene.points, other.points)


def test_splits_shapes_and_disjoint_views(scene):
    assert scene.train.images.shape == (5, 24, 24, 3) and scene.train.images.dtype == torch.uint8
    assert (len(scene.val), len(scene.test)) == (2, 3)
    centres = torch.cat([scene.train.cameras.centers, scene.val.cameras.centers, scene.test.cameras.centers])
    distances = torch.cdist(centres, centres) + torch.eye(len(centres)) * 1e3
    assert distances.min() > 0.05, "a view appears twice"
    names = scene.train.names + scene.val.names + scene.test.names
    assert len(set(names)) == len(names)


def test_images_are_not_trivial(scene):
    for image in scene.train.images:
        pixels = image.reshape(-1, 3).float() / 255
        assert pixels.std(0).mean() > 0.1
        assert len(torch.unique(image.reshape(-1, 3), dim=0)) > 100


def test_every_camera_looks_at_the_target(scene):
    target = torch.tensor(LOOK_AT, dtype=torch.float64)
    for cameras in (scene.train.cameras, scene.test.cameras):
        for w2c, k in zip(cameras.world_to_camera.double(), cameras.intrinsics.double(), strict=True):
            cam = w2c[:3, :3] @ target + w2c[:3, 3]
            u, v = k[0, 0] * cam[0] / cam[2] + k[0, 2], k[1, 1] * cam[1] / cam[2] + k[1, 2]
            assert cam[2] > 0 and abs(u - 12) < 1e-3 and abs(v - 12) < 1e-3
            centre = -w2c[:3, :3].T @ w2c[:3, 3]
            assert centre[2] > 0.5 and centre.norm() < DOME_RADIUS - 1, "camera above ground, inside the dome"


def test_ray_hits_match_the_documented_geometry():
    origins = torch.tensor([[0.0, 0, 5], [0.9, 0.5, 3], [1.5, 1.5, 3], [0, 0, 3], [-0.8, -0.5, 3]])
    dirs = torch.tensor([[0.0, 0, -1], [0, 0, -1], [0, 0, -1], [1, 0, 0], [0, 0, -1]])
    colors, points = trace(origins, dirs)
    expected = torch.tensor(
        [
            [0.0, 0, 0.9],  # top of the big sphere (centre z 0.45, radius 0.45)
            [0.9, 0.5, 0.5],  # top of the small sphere (0.9, 0.5, 0.25), radius 0.25
            [1.5, 1.5, 0.0],  # open ground
            [math.sqrt(DOME_RADIUS**2 - 9), 0, 3],  # the sky dome
            [-0.8, -0.5, 0.6],  # top face of the box standing on the ground, 0.6 high
        ]
    )
    assert torch.allclose(points, expected, atol=1e-4)
    assert colors.shape == (5, 3) and colors.min() >= 0 and colors.max() <= 1


def test_initial_points_lie_on_seen_surfaces(scene):
    assert scene.points.shape == (300, 3) and scene.colors.shape == (300, 3)
    assert scene.colors.min() >= 0 and scene.colors.max() <= 1
    assert scene.points[:, 2].min() > -0.05 and scene.points.norm(dim=1).max() < DOME_RADIUS + 0.05
    on_ground = scene.points[:, 2].abs() < 0.05
    assert 0.1 < on_ground.float().mean() < 0.95

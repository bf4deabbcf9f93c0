"""The interpolation camera path: through the training poses at its knots, proper rotations between them."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_grendel.splatting.cameras import Cameras, look_at_world_to_camera
from lightning_grendel.splatting.projection import quaternion_to_rotation
from lightning_grendel.splatting.viewer.camera_paths import camera_path, interpolation_path, rotation_to_quaternion
from tests.helpers.scenes import orbit_cameras


def posed_cameras(eyes: torch.Tensor, targets: torch.Tensor) -> Cameras:
    world_to_camera = look_at_world_to_camera(eyes.double(), targets.double()).float()
    intrinsics = torch.tensor([[20.0, 0, 10], [0, 20.0, 8], [0, 0, 1]]).expand(len(eyes), 3, 3).clone()
    return Cameras(world_to_camera, intrinsics, 20, 16)


def scattered_cameras(count: int = 5, seed: int = 0) -> Cameras:
    """Cameras at uneven heights and distances, each looking at its own point near the origin."""
    generator = torch.Generator().manual_seed(seed)
    angles = torch.linspace(0, 2.5, count) + 0.2 * torch.rand(count, generator=generator)
    radii = 3.0 + torch.rand(count, generator=generator)
    eyes = torch.stack([radii * angles.cos(), radii * angles.sin(), torch.rand(count, generator=generator)], -1)
    return posed_cameras(eyes, 0.3 * torch.randn(count, 3, generator=generator))


@pytest.mark.parametrize("per_segment", [1, 4])
def test_the_path_passes_through_every_training_pose_at_its_knots(per_segment):
    cameras = scattered_cameras()
    path = interpolation_path(cameras, per_segment * (len(cameras) - 1) + 1)
    knots = path.world_to_camera[::per_segment]
    torch.testing.assert_close(knots, cameras.world_to_camera, atol=2e-5, rtol=0)
    assert path.intrinsics.shape == (len(path), 3, 3) and (path.width, path.height) == (20, 16)


def test_rotations_stay_orthonormal_and_the_path_moves_smoothly():
    cameras = scattered_cameras(6, seed=1)
    path = interpolation_path(cameras, 51)
    rotation = path.world_to_camera[:, :3, :3].double()
    eye = torch.eye(3, dtype=torch.float64).expand_as(rotation)
    torch.testing.assert_close(rotation @ rotation.transpose(1, 2), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(len(path), dtype=torch.float64), atol=1e-5,
                               rtol=0)
    steps = (path.centers[1:] - path.centers[:-1]).norm(dim=1)
    knot_gaps = (cameras.centers[1:] - cameras.centers[:-1]).norm(dim=1)
    assert steps.max() < 0.5 * knot_gaps.min()  # ten frames a segment: no jump anywhere
    assert not torch.allclose(path.world_to_camera[5], path.world_to_camera[0], atol=1e-2)  # between knots: new


def test_between_two_cameras_rotation_is_slerped_and_position_is_linear():
    # One eye turning from looking at angle 0 to angle 1.2 about +z: the midpoint looks at angle 0.6.
    target = lambda angle: torch.tensor([math.cos(angle), math.sin(angle), 0.0])  # noqa: E731
    eye = torch.zeros(2, 3)
    cameras = posed_cameras(eye, torch.stack([target(0.0), target(1.2)]))
    middle = interpolation_path(cameras, 3)[1]
    expected = look_at_world_to_camera(torch.zeros(3, dtype=torch.float64), target(0.6).double()).float()
    torch.testing.assert_close(middle.world_to_camera[0], expected, atol=1e-5, rtol=0)
    moved = posed_cameras(torch.tensor([[0.0, 0, 0], [2.0, 4.0, -2.0]]), torch.tensor([[5.0, 0, 0], [5.0, 6.0, 0]]))
    torch.testing.assert_close(interpolation_path(moved, 5).centers[2], torch.tensor([1.0, 2.0, -1.0]), atol=1e-5,
                               rtol=0)  # two knots: the spline's linear ends make it a straight line


def test_quaternions_round_trip_including_half_turns():
    generator = torch.Generator().manual_seed(3)
    quats = torch.randn(200, 4, generator=generator, dtype=torch.float64)
    half_turns = torch.tensor([[0.0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1e-4, 0.6, 0.8, 0]], dtype=torch.float64)
    rotation = quaternion_to_rotation(torch.cat([quats, half_turns]))
    torch.testing.assert_close(quaternion_to_rotation(rotation_to_quaternion(rotation)), rotation, atol=1e-10, rtol=0)


def test_nearest_order_tours_an_unordered_capture():
    along = torch.tensor([0.0, 3.0, 1.0, 4.0, 2.0])  # cameras on a line, listed out of order
    eyes = torch.stack([along, torch.full((5,), -5.0), torch.zeros(5)], -1)
    cameras = posed_cameras(eyes, eyes + torch.tensor([0.0, 1.0, 0.0]))
    touring = interpolation_path(cameras, 9, order="nearest").centers[::2, 0]
    torch.testing.assert_close(touring, torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]), atol=1e-5, rtol=0)
    in_order = interpolation_path(cameras, 9).centers[::2, 0]
    torch.testing.assert_close(in_order, along, atol=1e-5, rtol=0)


def test_one_camera_and_one_frame():
    cameras = orbit_cameras(1, 20, 10)
    torch.testing.assert_close(interpolation_path(cameras, 4).world_to_camera,
                               cameras.world_to_camera.expand(4, 4, 4), atol=1e-5, rtol=0)
    one = interpolation_path(orbit_cameras(3, 20, 10), 1, width=10)
    assert len(one) == 1 and (one.width, one.height) == (10, 5)


def test_bad_path_values_name_the_argument():
    cameras = orbit_cameras(3, 20, 10)
    with pytest.raises(ValueError, match="orbit, interpolate; got 'spiral'"):
        camera_path("spiral", cameras, 4)
    with pytest.raises(ValueError, match="order must be one of training, nearest; got 'random'"):
        interpolation_path(cameras, 4, order="random")
    with pytest.raises(ValueError, match="frames must be >= 1"):
        interpolation_path(cameras, 0)

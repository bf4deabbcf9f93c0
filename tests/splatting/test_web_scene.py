"""What the browser viewer is sent: covariances, colours, opacities and camera poses, checked against
independent formulas (SciPy rotations, the demo scene's known cameras)."""

from __future__ import annotations

import math
import socket
import urllib.parse

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from lightning_grendel.splatting.cameras import Cameras, intrinsics_matrix, look_at_world_to_camera
from lightning_grendel.splatting.data.demo_scene import FIELD_OF_VIEW, make_demo_scene
from lightning_grendel.splatting.viewer.scene_server import PortInUseError, ViewerError, camera_url, check_port
from lightning_grendel.splatting.viewer.web_scene import (
    FLOAT16_MAX,
    overview_camera,
    salient,
    web_cameras,
    web_gaussians,
)


def _params(n: int = 64, seed: int = 0, extent: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "means": torch.randn(n, 3, generator=g) * extent,
        "scales": torch.randn(n, 3, generator=g) * 0.5 - 2.0 + math.log(extent),
        "quats": torch.randn(n, 4, generator=g),
        "opacities": torch.randn(n, generator=g),
        "sh0": torch.randn(n, 1, 3, generator=g),
        "shN": torch.randn(n, 3, 3, generator=g),
    }


def _reference_covariances(params: dict[str, torch.Tensor]) -> np.ndarray:
    wxyz = params["quats"].double().numpy()
    rotation = Rotation.from_quat(wxyz[:, [1, 2, 3, 0]]).as_matrix()  # SciPy is scalar-last (and normalises)
    variances = np.exp(2 * params["scales"].double().numpy())
    return np.einsum("nij,nj,nkj->nik", rotation, variances, rotation)


def _assert_covariances_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Float32 maths, relative to each matrix's largest entry (the page keeps float16, 1e-3)."""
    error = np.abs(actual - expected).max(axis=(1, 2))
    assert (error <= 2e-6 * np.abs(expected).max(axis=(1, 2))).all(), error.max()


def test_gaussians_become_covariances_base_colours_and_opacities():
    params = _params()
    web = web_gaussians(params)
    assert web.scale == 1.0
    np.testing.assert_allclose(web.centers, params["means"].numpy(), rtol=0, atol=0)
    _assert_covariances_close(web.covariances, _reference_covariances(params))
    base = 0.5 + 0.28209479177387814 * params["sh0"][:, 0].double().numpy()
    np.testing.assert_allclose(web.rgbs, np.clip(base, 0, 1), atol=1e-7)
    np.testing.assert_allclose(web.opacities[:, 0], 1 / (1 + np.exp(-params["opacities"].double().numpy())), atol=1e-7)
    assert web.centers.dtype == web.covariances.dtype == web.rgbs.dtype == np.float32


def test_a_capped_scene_keeps_the_gaussians_with_most_opacity_times_cross_section():
    params = _params(n=500, seed=3)
    # Reference: float64, through the covariance's eigenvalues (the squared scales), in a Python sort.
    eigen = np.linalg.eigvalsh(_reference_covariances(params))  # ascending
    cross_section = np.sqrt(eigen[:, 1] * eigen[:, 2])
    opacity = 1 / (1 + np.exp(-params["opacities"].double().numpy()))
    ranked = sorted(range(500), key=lambda i: -opacity[i] * cross_section[i])
    for limit in (1, 37, 499):
        keep = salient(params["opacities"].numpy(), params["scales"].numpy(), limit)
        np.testing.assert_array_equal(keep, sorted(ranked[:limit]))
        capped, full = web_gaussians(params, limit), web_gaussians(params)
        np.testing.assert_array_equal(capped.centers, full.centers[keep])  # the same rows, converted alike
        np.testing.assert_array_equal(capped.covariances, full.covariances[keep])
        np.testing.assert_array_equal(capped.rgbs, full.rgbs[keep])
        np.testing.assert_array_equal(capped.opacities, full.opacities[keep])
    np.testing.assert_array_equal(salient(params["opacities"].numpy(), params["scales"].numpy(), 500), np.arange(500))
    assert len(web_gaussians(params, 10_000).centers) == 500


def test_large_scenes_are_divided_by_a_power_of_two_so_covariances_fit_float16():
    params = _params(extent=2000.0)
    web = web_gaussians(params)
    assert web.scale > 1 and math.log2(web.scale).is_integer()
    assert np.abs(web.covariances).max() <= FLOAT16_MAX / 4
    np.testing.assert_allclose(web.centers * web.scale, params["means"].numpy(), rtol=1e-7)
    _assert_covariances_close(web.covariances * web.scale**2, _reference_covariances(params))


def test_cameras_keep_their_centre_orientation_and_field_of_view():
    scene = make_demo_scene(image_width=40, downscale=1.0, seed=0, num_points=10)
    cameras = scene.train.cameras
    web = web_cameras(cameras)
    world_to_camera = cameras.world_to_camera.double()
    for camera, matrix in zip(web, world_to_camera, strict=True):
        centre = -matrix[:3, :3].T @ matrix[:3, 3]
        np.testing.assert_allclose(camera.position, centre.numpy(), atol=1e-6)
        # x_cam = R x_world + t: the world position 1 unit along `forward` maps to (0, 0, 1) in the camera.
        np.testing.assert_allclose((matrix[:3, :3] @ torch.from_numpy(camera.forward) ), [0, 0, 1], atol=1e-6)
        np.testing.assert_allclose((matrix[:3, :3] @ torch.from_numpy(camera.up)), [0, -1, 0], atol=1e-6)
        assert camera.fov == pytest.approx(FIELD_OF_VIEW, abs=1e-6) and camera.aspect == 1.0


def test_look_at_camera_and_url_round_trip():
    eye, target = torch.tensor([[3.0, -2.0, 1.5]]), torch.tensor([0.2, 0.1, 0.3])
    cameras = Cameras(look_at_world_to_camera(eye, target), intrinsics_matrix(50.0, 50.0, 40.0, 30.0)[None], 80, 60)
    (camera,) = web_cameras(cameras)
    assert camera.fov == pytest.approx(2 * math.atan(30.0 / 50.0)) and camera.aspect == pytest.approx(80 / 60)
    direction = (target - eye[0]).numpy()
    np.testing.assert_allclose(camera.forward, direction / np.linalg.norm(direction), atol=1e-6)
    assert camera.up[2] > 0  # look_at_world_to_camera puts +z at the top of the image
    query = urllib.parse.parse_qs(urllib.parse.urlparse(camera_url("http://127.0.0.1:1/", camera, 2.0)).query)
    vector = [float(v) for v in query["initialCameraPosition"][0].split(",")]
    assert vector == [float(v) for v in camera.position]  # repr() keeps every bit
    look_at = np.array([float(v) for v in query["initialCameraLookAt"][0].split(",")])
    np.testing.assert_allclose(look_at, camera.position + 2.0 * camera.forward)
    assert float(query["initialCameraFov"][0]) == camera.fov


def test_overview_camera_looks_at_the_median_from_outside():
    centers = np.random.default_rng(0).normal(size=(500, 3)) + np.array([10.0, 0.0, 0.0])
    position, look_at = overview_camera(centers)
    np.testing.assert_allclose(look_at, np.median(centers, axis=0))
    assert np.linalg.norm(position - look_at) > np.quantile(np.linalg.norm(centers - look_at, axis=1), 0.9)


def test_port_check_names_the_flag():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"--port {port}: already in use"):
            check_port("127.0.0.1", port)
    check_port("127.0.0.1", port)  # free again
    with pytest.raises(ViewerError, match="--host 203.0.113.7"):  # TEST-NET-3: never an address of this machine
        check_port("203.0.113.7", port)

"""COLMAP reader: binary == text, poses against the Blender ground truth, and clear errors on bad input."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
import torch

from lightning_grendel.splatting.data.colmap import (
    ColmapFormatError,
    UnsupportedCameraModelError,
    find_model_dir,
    load_colmap_scene,
    read_cameras_binary,
    read_model,
    read_points3d_binary,
)


@pytest.fixture(scope="module")
def blocks(shared_dataset):
    return shared_dataset("colmap_blocks")


@pytest.fixture(scope="module")
def models(blocks):
    return read_model(blocks / "sparse" / "0"), read_model(blocks / "sparse" / "0_txt")


def test_binary_and_text_models_agree(models):
    binary, text = models
    assert binary.path.name == "0" and text.path.name == "0_txt"
    assert binary.cameras.keys() == text.cameras.keys()
    for camera_id, camera in binary.cameras.items():
        other = text.cameras[camera_id]
        assert (camera.model, camera.width, camera.height) == (other.model, other.width, other.height)
        np.testing.assert_allclose(camera.params, other.params, rtol=1e-14)
    assert binary.images.keys() == text.images.keys() and len(binary.images) == 50
    for image_id, image in binary.images.items():
        other = text.images[image_id]
        assert (image.name, image.camera_id, image.num_points2d) == (other.name, other.camera_id, other.num_points2d)
        np.testing.assert_allclose(image.qvec, other.qvec, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(image.tvec, other.tvec, rtol=1e-14, atol=1e-15)
    a, b = binary.points, text.points
    assert len(a.ids) == len(b.ids) == 13454
    order_a, order_b = np.argsort(a.ids), np.argsort(b.ids)
    assert np.array_equal(a.ids[order_a], b.ids[order_b])
    np.testing.assert_allclose(a.xyz[order_a], b.xyz[order_b], rtol=1e-14, atol=1e-15)
    assert np.array_equal(a.rgb[order_a], b.rgb[order_b])
    np.testing.assert_allclose(a.errors[order_a], b.errors[order_b], rtol=1e-12)
    assert np.array_equal(a.track_lengths[order_a], b.track_lengths[order_b])
    # README: 67170 observations in total, mean 1343 per image.
    assert a.track_lengths.sum() == 67170
    assert sum(image.num_points2d for image in binary.images.values()) >= 67170


def test_intrinsics_match_the_readme(models):
    camera = models[0].cameras[1]
    assert (camera.model, camera.width, camera.height) == ("PINHOLE", 480, 360)
    assert camera.params == pytest.approx((466.76131231155233, 467.14722135294528, 240.0, 180.0), rel=1e-15)


def umeyama(source: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity (s, R, t) minimising |s R source + t - target|^2 (Umeyama 1991)."""
    mu_s, mu_t = source.mean(0), target.mean(0)
    xs, xt = source - mu_s, target - mu_t
    u, d, vt = np.linalg.svd(xt.T @ xs / len(source))
    sign = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(d) @ sign) / xs.var(0).sum()
    return scale, rotation, mu_t - scale * rotation @ mu_s


def test_poses_agree_with_ground_truth_after_similarity_alignment(blocks):
    scene = load_colmap_scene(blocks, image_width=48)
    truth = {f["file_name"]: f for f in json.loads((blocks / "gt_poses.json").read_text())["frames"]}
    names, w2c = [], []
    for split in (scene.train, scene.test):
        names += split.names
        w2c.append(split.cameras.world_to_camera.double().numpy())
    w2c = np.concatenate(w2c)
    centres = np.einsum("nji,nj->ni", w2c[:, :3, :3], -w2c[:, :3, 3])
    true_centres = np.array([truth[name]["camera_center"] for name in names])
    scale, rotation, translation = umeyama(centres, true_centres)
    aligned = scale * centres @ rotation.T + translation
    errors = np.linalg.norm(aligned - true_centres, axis=1)
    assert errors.mean() < 0.01 and errors.max() < 0.02, errors  # README: mean 0.0027, max 0.0044
    for i, name in enumerate(names):
        # x_cam = R_c x_colmap + t_c and x_colmap = (R^T (x_true - t)) / s, so R_true = R_c R^T.
        expected = np.array(truth[name]["world_to_camera_opencv_R"])
        cosine = (np.trace(w2c[i, :3, :3] @ rotation.T @ expected.T) - 1) / 2
        assert np.degrees(np.arccos(np.clip(cosine, -1, 1))) < 0.3, name  # README: max 0.109 deg


def test_scene_splits_images_and_points(blocks):
    scene = load_colmap_scene(blocks, image_width=120, test_every=8)
    assert scene.train.images.shape == (43, 90, 120, 3) and scene.test.images.shape == (7, 90, 120, 3)
    assert scene.val is scene.test
    k = scene.train.cameras.intrinsics[0]
    expected = torch.tensor([[466.76131 / 4, 0, 60], [0, 467.14722 / 4, 45], [0, 0, 1]])
    assert torch.allclose(k, expected, atol=1e-4)
    assert scene.points.shape == (13454, 3) and scene.colors.max() <= 1 and scene.colors.min() >= 0
    # Most reconstructed points lie in front of a camera and inside its image.
    w2c, k = scene.test.cameras.world_to_camera[0], scene.test.cameras.intrinsics[0]
    cam = scene.points @ w2c[:3, :3].T + w2c[:3, 3]
    uv = cam[:, :2] / cam[:, 2:] * k.diagonal()[:2] + k[:2, 2]
    inside = (cam[:, 2] > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < 120) & (uv[:, 1] >= 0) & (uv[:, 1] < 90)
    assert inside.float().mean() > 0.5


def test_model_folder_layouts(blocks, tmp_path):
    assert find_model_dir(blocks) == blocks / "sparse" / "0"
    assert find_model_dir(blocks / "sparse" / "0") == blocks / "sparse" / "0"
    shutil.copytree(blocks / "sparse" / "0_txt", tmp_path / "sparse")
    assert find_model_dir(tmp_path) == tmp_path / "sparse"
    assert len(read_model(tmp_path).images) == 50


def _copy_binary_model(blocks, destination):
    shutil.copytree(blocks / "sparse" / "0", destination)
    return destination


def test_truncated_cameras_bin_names_file_and_what_is_missing(blocks, tmp_path):
    model = _copy_binary_model(blocks, tmp_path / "model")
    data = (model / "cameras.bin").read_bytes()
    (model / "cameras.bin").write_bytes(data[:40])
    with pytest.raises(ColmapFormatError) as info:
        read_model(model)
    message = str(info.value)
    assert "cameras.bin" in message and "truncated" in message
    assert "expected 32 bytes for the PINHOLE parameters of camera 1 at offset 32" in message


@pytest.mark.parametrize("name", ["images.bin", "points3D.bin"])
def test_truncated_or_padded_binary_files_are_errors(blocks, tmp_path, name):
    model = _copy_binary_model(blocks, tmp_path / "model")
    data = (model / name).read_bytes()
    (model / name).write_bytes(data[:-5])
    with pytest.raises(ColmapFormatError, match=rf"{name}: truncated: expected \d+ bytes for"):
        read_model(model)
    (model / name).write_bytes(data + b"\0\0\0")
    with pytest.raises(ColmapFormatError, match=rf"{name}: 3 unexpected bytes after the last record"):
        read_model(model)


def test_unsupported_camera_model_in_text_says_to_undistort(tmp_path):
    (tmp_path / "cameras.txt").write_text("# a comment\n7 FOV 640 480 500 500 320 240 0.9\n")
    with pytest.raises(UnsupportedCameraModelError) as info:
        read_model(tmp_path)
    message = str(info.value)
    assert "cameras.txt" in message and "camera 7" in message and "FOV" in message
    assert "colmap image_undistorter" in message


def test_unsupported_camera_model_in_binary(tmp_path):
    path = tmp_path / "cameras.bin"
    path.write_bytes(struct.pack("<QiiQQ12d", 1, 3, 10, 640, 480, *range(12)))  # model 10 = THIN_PRISM_FISHEYE
    with pytest.raises(UnsupportedCameraModelError, match=r"cameras\.bin: camera 3 uses the THIN_PRISM_FISHEYE model"):
        read_cameras_binary(path)


def test_text_model_with_simple_pinhole_and_an_image_without_points(tmp_path):
    (tmp_path / "cameras.txt").write_text("2 SIMPLE_PINHOLE 64 48 50.5 32 24\n")
    (tmp_path / "images.txt").write_text(
        "# header\n1 1 0 0 0 0.5 0 2 2 a.png\n\n2 0 1 0 0 0 0 3 2 b c.png\n10.5 3.5 7 1 2 -1\n"
    )
    (tmp_path / "points3D.txt").write_text("7 0.25 0.5 0.75 10 20 30 0.5 2 0\n")
    model = read_model(tmp_path)
    assert torch.equal(
        model.cameras[2].intrinsics(), torch.tensor([[50.5, 0, 32], [0, 50.5, 24], [0, 0, 1.0]]).double()
    )
    assert model.images[1].num_points2d == 0 and model.images[2].num_points2d == 2
    assert model.images[2].name == "b c.png"
    # q = (0, 1, 0, 0) is a rotation by pi about x: diag(1, -1, -1).
    expected = torch.tensor([[1.0, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 3], [0, 0, 0, 1]], dtype=torch.float64)
    assert torch.allclose(model.images[2].world_to_camera(), expected, atol=1e-15)
    assert model.points.rgb.tolist() == [[10, 20, 30]] and model.points.track_lengths.tolist() == [1]


def test_malformed_text_line_names_file_and_line(tmp_path):
    (tmp_path / "cameras.txt").write_text("1 PINHOLE 64 48 50 50 32\n")
    with pytest.raises(ColmapFormatError, match=r"cameras\.txt:1: camera 1 \(PINHOLE\) needs 4 parameters, got 3"):
        read_model(tmp_path)


def test_absurd_record_count_is_reported_before_allocating(tmp_path):
    path = tmp_path / "points3D.bin"
    path.write_bytes(struct.pack("<Q", 1 << 60) + bytes(100))
    with pytest.raises(ColmapFormatError, match=r"points3D\.bin: truncated or corrupt: the header announces"):
        read_points3d_binary(path)

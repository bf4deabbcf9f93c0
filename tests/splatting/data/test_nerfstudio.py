"""nerfstudio ``transforms.json`` against ground truth, in the layouts ns-process-data, Polycam and Record3D
write; ``images_<d>`` folders (nerfstudio and COLMAP); bad files.

Like the undistortion tests: a smooth scene is rendered with a pinhole camera and resampled through the
lens model (nerfstudio's own formulas, ``tests/helpers/distortion.py``) into what the capture's camera
saw; the poses are written as nerfstudio does (OpenGL camera-to-world). The loaded images must match a
pinhole render at the loader's pose and intrinsics, and the loaded poses the true ones.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_grendel.splatting.cameras import look_at_world_to_camera
from lightning_grendel.splatting.data.colmap import load_colmap_scene
from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule, detect_format
from lightning_grendel.splatting.data.nerfstudio import NerfstudioFormatError, load_nerfstudio_scene
from lightning_grendel.splatting.data.validate import CameraDataError
from tests.helpers.distortion import (
    CX,
    CY,
    FOCAL,
    HEIGHT,
    MAX_ERROR,
    MIN_PSNR,
    WIDTH,
    distorted_image,
    psnr,
    quaternion_wxyz,
    render,
    smooth_scene,
)
from tests.helpers.nerfstudio_capture import write_capture_from_colmap, write_ply

# nerfstudio's perspective model is k1..k4 of r^2 plus p1, p2; the fisheye k1..k4 of theta.
LENSES = {
    "PINHOLE": ("NERFSTUDIO", {}),
    "OPENCV": ("NERFSTUDIO", {"k1": -0.18, "k2": 0.03, "p1": 0.004, "p2": -0.003}),
    "OPENCV_k3": ("NERFSTUDIO", {"k1": -0.15, "k2": 0.04, "k3": -0.1}),
    "OPENCV_FISHEYE": ("OPENCV_FISHEYE", {"k1": 0.08, "k2": -0.02, "k3": 0.005, "k4": 0.0}),
}


def three_poses() -> list[torch.Tensor]:
    eyes = [torch.tensor([4.0 * math.cos(a), 4.0 * math.sin(a), 1.0 + 0.2 * a]) for a in (0.3, 1.4, 2.6)]
    return [look_at_world_to_camera(eye, torch.zeros(3)) for eye in eyes]


def opengl_camera_to_world(world_to_camera: torch.Tensor) -> list[list[float]]:
    """What nerfstudio stores: the inverse pose with the camera's y and z axes negated (OpenGL)."""
    c2w = torch.linalg.inv(world_to_camera.double())
    c2w[:3, 1:3] *= -1
    return c2w.tolist()


def coefficients(model: str, lens: dict) -> list[float]:
    if model == "OPENCV_FISHEYE":
        return [lens.get(k, 0.0) for k in ("k1", "k2", "k3", "k4")]
    return [lens.get(k, 0.0) for k in ("k1", "k2", "k3", "k4", "p1", "p2")]


def save(image: np.ndarray, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(path)


def write_capture(root, scene, lens_name: str, layout: str) -> list[torch.Tensor]:
    """Three frames; ``global``: one camera at the top level (ns-process-data, Record3D); ``per_frame``:
    intrinsics in every frame with a different principal point each (Polycam)."""
    forward, lens = LENSES[lens_name]
    model = "OPENCV_FISHEYE" if lens_name == "OPENCV_FISHEYE" else ("PINHOLE" if lens_name == "PINHOLE" else "OPENCV")
    meta: dict = {"camera_model": model, "frames": []}
    if layout == "global":
        meta.update({"fl_x": FOCAL, "fl_y": FOCAL * 1.01, "cx": CX, "cy": CY, "w": WIDTH, "h": HEIGHT, **lens})
    pose_list = three_poses()
    for index, pose in enumerate(pose_list):
        cx = CX + (index - 1) * 1.5 if layout == "per_frame" else CX
        intrinsics = (FOCAL, FOCAL * 1.01, cx, CY)
        name = f"images/frame_{index + 1:05d}.png"
        save(distorted_image(scene, pose, forward, coefficients(lens_name, lens), intrinsics), root / name)
        frame = {"file_path": f"./{name}" if index else name, "transform_matrix": opengl_camera_to_world(pose)}
        if layout == "per_frame":
            frame.update({"fl_x": FOCAL, "fl_y": FOCAL * 1.01, "cx": cx, "cy": CY, "w": WIDTH, "h": HEIGHT, **lens})
        meta["frames"].append(frame)
    (root / "transforms.json").write_text(json.dumps(meta))
    return pose_list


CASES = [("PINHOLE", "global"), ("OPENCV", "global"), ("OPENCV_k3", "global"), ("OPENCV_FISHEYE", "global"),
         ("OPENCV", "per_frame"), ("PINHOLE", "per_frame")]


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("lens", "layout"), CASES)
def test_loaded_images_and_poses_match_the_ground_truth(tmp_path, lens, layout):
    scene = smooth_scene()
    truth = write_capture(tmp_path, scene, lens, layout)
    assert detect_format(tmp_path) == "nerfstudio"
    data = load_nerfstudio_scene(tmp_path, test_every=2, num_init_points=50)
    assert data.test.names == ["images/frame_00001.png", "images/frame_00003.png"]
    assert data.train.names == ["images/frame_00002.png"]
    for split, indices in ((data.test, (0, 2)), (data.train, (1,))):
        cameras = split.cameras
        for row, index in enumerate(indices):
            assert torch.allclose(cameras.world_to_camera[row], truth[index], atol=1e-5)
            k = cameras.intrinsics[row]
            if lens == "PINHOLE":  # as written: nothing to undistort, pixel centres at +0.5 on both sides
                cx = CX + (index - 1) * 1.5 if layout == "per_frame" else CX
                assert torch.allclose(k, torch.tensor([[FOCAL, 0, cx], [0, FOCAL * 1.01, CY], [0, 0, 1.0]]))
            expected = render(scene, cameras.world_to_camera[row], k, cameras.width, cameras.height)
            loaded = split.images[row].numpy().astype(np.float64) / 255.0
            assert psnr(loaded, expected) > MIN_PSNR, (lens, layout, index, psnr(loaded, expected))
            assert np.abs(loaded - expected).max() < MAX_ERROR
            if lens != "PINHOLE":  # the test can fail: the distorted image is far from the pinhole render
                raw = np.asarray(Image.open(tmp_path / "images" / f"frame_{index + 1:05d}.png"), np.float64) / 255
                naive = raw[: cameras.height, : cameras.width]
                assert psnr(naive, expected) < MIN_PSNR - 6
    # No ply_file_path: random points in the cube around the cameras.
    centres = torch.stack([torch.linalg.inv(p)[:3, 3] for p in truth])
    assert data.points.shape == (50, 3)
    assert (data.points >= centres.min(0).values - 1e-4 - (centres.max(0).values - centres.min(0).values).max()).all()


def test_ns_process_data_layout_points_splits_and_applied_transform(tmp_path):
    """ns-process-data writes sparse_pc.ply already through applied_transform: it must not be applied again."""
    scene = smooth_scene()
    write_capture(tmp_path, scene, "OPENCV", "global")
    meta = json.loads((tmp_path / "transforms.json").read_text())
    xyz = np.random.default_rng(0).uniform(-2, 2, (40, 3)).astype(np.float32)
    rgb = np.random.default_rng(1).integers(0, 256, (40, 3)).astype(np.uint8)
    write_ply(tmp_path / "sparse_pc.ply", xyz, rgb)
    meta.update({"ply_file_path": "sparse_pc.ply", "applied_transform": [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, -1, 0]],
                 "train_filenames": ["images/frame_00001.png", "images/frame_00003.png"],
                 "test_filenames": ["images/frame_00002.png"]})
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    data = GaussianSplattingDataModule(path=str(tmp_path)).scene
    assert torch.equal(data.points, torch.from_numpy(xyz)) and torch.equal(data.colors, torch.from_numpy(rgb) / 255.0)
    assert data.test.names == ["images/frame_00002.png"] and len(data.train) == 2
    assert data.val is data.test


def test_downscaled_folder_is_read_instead_of_resizing(tmp_path):
    """images_2 holds the true half-size photos (odd sizes: 81x61 -> 41x31, unequal x and y ratios)."""
    scene = smooth_scene()
    width, height, size = 81, 61, (41, 31)
    intrinsics = (FOCAL, FOCAL, 40.2, 30.9)
    pose_list = three_poses()[:2]
    meta = {"camera_model": "OPENCV", "fl_x": intrinsics[0], "fl_y": intrinsics[1], "cx": intrinsics[2],
            "cy": intrinsics[3], "w": width, "h": height, "frames": []}
    sx, sy = size[0] / width, size[1] / height
    small_k = torch.tensor([[FOCAL * sx, 0, 40.2 * sx], [0, FOCAL * sy, 30.9 * sy], [0, 0, 1.0]], dtype=torch.float64)
    for index, pose in enumerate(pose_list):
        save(render(scene, pose, torch.tensor([[FOCAL, 0, 40.2], [0, FOCAL, 30.9], [0, 0, 1.0]]), width, height),
             tmp_path / "images" / f"{index}.png")
        save(render(scene, pose, small_k, *size), tmp_path / "images_2" / f"{index}.png")
        meta["frames"].append({"file_path": f"images/{index}.png", "transform_matrix": opengl_camera_to_world(pose)})
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    data = load_nerfstudio_scene(tmp_path, downscale=2, test_every=2, num_init_points=10)
    assert (data.test.cameras.width, data.test.cameras.height) == size
    assert torch.allclose(data.test.cameras.intrinsics[0].double(), small_k, atol=1e-5)
    stored = np.asarray(Image.open(tmp_path / "images_2" / "0.png"))
    assert np.array_equal(data.test.images[0].numpy(), stored)  # read as is: no resampling
    # Without the folder the full images are area-resized on the fly to round(81 / 2) x round(61 / 2).
    (tmp_path / "images_2" / "0.png").rename(tmp_path / "moved.png")
    with pytest.raises(FileNotFoundError, match="images_2 holds no copy of 0.png"):
        load_nerfstudio_scene(tmp_path, downscale=2, test_every=2, num_init_points=10)
    (tmp_path / "images_2" / "1.png").unlink()
    (tmp_path / "images_2").rmdir()
    resized = load_nerfstudio_scene(tmp_path, downscale=2, test_every=2, num_init_points=10)
    assert (resized.test.cameras.width, resized.test.cameras.height) == (40, 30)


def test_colmap_downscaled_folder_with_distortion_matches_the_ground_truth(tmp_path):
    """COLMAP + SIMPLE_RADIAL + images_2 (made from the distorted photos at half size): the camera is scaled
    per axis and becomes OPENCV; the undistorted half-size images match pinhole renders."""
    scene = smooth_scene()
    (tmp_path / "sparse" / "0").mkdir(parents=True)
    width, height = 2 * WIDTH, 2 * HEIGHT
    k1 = -0.12
    pose_list = three_poses()[:2]
    images = []
    for index, pose in enumerate(pose_list):
        full = distorted_image(scene, pose, "SIMPLE_RADIAL", [k1], (2 * FOCAL, 2 * FOCAL, 2 * CX, 2 * CY),
                               (width, height))
        save(full, tmp_path / "images" / f"v{index}.png")
        half = distorted_image(scene, pose, "SIMPLE_RADIAL", [k1], (FOCAL, FOCAL, CX, CY), (WIDTH, HEIGHT))
        save(half, tmp_path / "images_2" / f"v{index}.png")
        m = pose.double().numpy()
        images.append(" ".join(map(str, [index + 1, *quaternion_wxyz(m[:3, :3]), *m[:3, 3], 1, f"v{index}.png"])))
    (tmp_path / "sparse" / "0" / "cameras.txt").write_text(
        f"1 SIMPLE_RADIAL {width} {height} {2 * FOCAL} {2 * CX} {2 * CY} {k1}\n")
    (tmp_path / "sparse" / "0" / "images.txt").write_text("\n\n".join(images) + "\n\n")
    (tmp_path / "sparse" / "0" / "points3D.txt").write_text("1 0 0 0 128 128 128 0.5\n")
    data = load_colmap_scene(tmp_path, downscale=2, test_every=2)
    cameras = data.test.cameras
    assert cameras.width <= WIDTH and cameras.height <= HEIGHT and cameras.width >= 0.8 * WIDTH
    expected = render(scene, pose_list[0], cameras.intrinsics[0], cameras.width, cameras.height)
    loaded = data.test.images[0].numpy() / 255.0
    assert psnr(loaded, expected) > MIN_PSNR, psnr(loaded, expected)


def write_minimal(root, **changes) -> None:
    save(np.zeros((4, 6, 3)), root / "images" / "a.png")
    meta = {"fl_x": 5.0, "fl_y": 5.0, "cx": 3.0, "cy": 2.0, "w": 6, "h": 4,
            "frames": [{"file_path": "images/a.png", "transform_matrix": np.eye(4).tolist()}]}
    meta.update(changes)
    (root / "transforms.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


@pytest.mark.parametrize("case", ["no_fl_x", "unknown_model", "perspective_k4", "fisheye_p1", "missing_image",
                                  "not_json", "no_frames", "bad_pose", "bad_w"])
def test_bad_transforms_name_the_file_and_the_problem(tmp_path, case):
    kinds: tuple[type[Exception], ...] = (NerfstudioFormatError,)
    if case == "no_fl_x":
        write_minimal(tmp_path, fl_x=None)
        needle = "frame 0 (images/a.png): no fl_x (give it at the top level or in every frame)"
    elif case == "unknown_model":
        write_minimal(tmp_path, camera_model="EQUIRECTANGULAR")
        needle = "camera_model 'EQUIRECTANGULAR' is not supported; supported: OPENCV, PINHOLE"
    elif case == "perspective_k4":
        write_minimal(tmp_path, k1=0.1, k4=0.01)
        needle = "k4 = 0.01 of a perspective camera"
    elif case == "fisheye_p1":
        write_minimal(tmp_path, camera_model="OPENCV_FISHEYE", k1=0.1, p1=0.01)
        needle = "p1/p2 given for an OPENCV_FISHEYE camera"
    elif case == "missing_image":
        write_minimal(tmp_path, frames=[{"file_path": "images/b.png", "transform_matrix": np.eye(4).tolist()}])
        kinds, needle = (FileNotFoundError,), "image images/b.png is registered but"
    elif case == "not_json":
        (tmp_path / "transforms.json").write_text("{not json")
        needle = "not a readable JSON file"
    elif case == "no_frames":
        write_minimal(tmp_path, frames=[])
        needle = "no 'frames' list"
    elif case == "bad_pose":
        write_minimal(tmp_path, frames=[{"file_path": "images/a.png", "transform_matrix": (2 * np.eye(4)).tolist()}])
        kinds, needle = (CameraDataError,), "frame 0 (images/a.png): the pose"
    else:
        write_minimal(tmp_path, w=6.5)
        needle = "w and h must be positive whole numbers"
    with pytest.raises(kinds) as info:
        load_nerfstudio_scene(tmp_path)
    assert "transforms.json" in str(info.value) and needle in str(info.value), str(info.value)


@pytest.mark.timeout(300)
def test_colmap_capture_converted_as_ns_process_data_does_loads_the_same_views(shared_dataset, tmp_path):
    """colmap_blocks written as ns-process-data's colmap_to_json writes it (OpenGL camera-to-world in a world
    with y and z swapped and z negated, that map as applied_transform, sparse_pc.ply through it): the same
    images and intrinsics, poses that differ by exactly that world map, points moved by it."""
    source = shared_dataset("colmap_blocks")
    applied, points = write_capture_from_colmap(source, tmp_path)
    colmap = load_colmap_scene(source, image_width=96)
    nerfstudio = load_nerfstudio_scene(tmp_path, image_width=96)
    for ours, theirs in ((nerfstudio.train, colmap.train), (nerfstudio.test, colmap.test)):
        assert ours.names == [f"images/{name}" for name in theirs.names]
        assert torch.equal(ours.images, theirs.images)
        assert torch.allclose(ours.cameras.intrinsics, theirs.cameras.intrinsics)
        world_map = torch.from_numpy(applied).float()
        assert torch.allclose(ours.cameras.world_to_camera @ world_map, theirs.cameras.world_to_camera, atol=1e-4)
    assert torch.allclose(nerfstudio.points, torch.from_numpy(points).float(), atol=1e-5)
    assert torch.allclose(nerfstudio.colors, colmap.colors)

"""Load-time undistortion against ground truth: pinhole renders, distorted by an independent forward model.

Each case renders a smooth procedural scene with a pinhole camera (supersampled, wide enough for every
distorted ray), resamples it into the distorted image a real lens would take (the forward model below,
inverted per pixel by fixed-point iteration, written here without OpenCV), saves a COLMAP text model
with the coefficients, and checks that the loader's undistorted images and intrinsics reproduce a
pinhole render of the same view on the loader's crop.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_grendel.splatting.cameras import Cameras, look_at_world_to_camera
from lightning_grendel.splatting.data.colmap import ColmapFormatError, UnsupportedCameraModelError, load_colmap_scene
from lightning_grendel.splatting.data.undistort import valid_rectangle
from lightning_grendel.splatting.render import SingleProcessRenderer

WIDTH, HEIGHT, FOCAL = 80, 60, 64.0
CX, CY = 40.7, 29.6  # off-centre, so a half-pixel convention slip shows
SUPERSAMPLE, MARGIN = 3, 1.8  # reference render: 3x the pixels, 1.8x the field of view
MIN_PSNR, MAX_ERROR = 38.0, 0.12  # undistorted vs pinhole render, on [0, 1] images (uint8 PNGs in between)


def smooth_scene(count: int = 300, seed: int = 3) -> dict[str, torch.Tensor]:
    """Large, soft Gaussians (a few pixels wide), so bilinear resampling is close to exact."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "means": torch.rand(count, 3, generator=generator) * 5.0 - 2.5,
        "scales": torch.log(torch.rand(count, 3, generator=generator) * 0.08 + 0.1),
        "quats": torch.randn(count, 4, generator=generator),
        "opacities": torch.randn(count, generator=generator) + 1.0,
        "sh0": torch.randn(count, 1, 3, generator=generator) * 1.5,
        "shN": torch.zeros(count, 0, 3),
    }


def poses() -> list[torch.Tensor]:
    eyes = [torch.tensor([4.0 * math.cos(a), 4.0 * math.sin(a), 1.2]) for a in (0.3, 1.9)]
    return [look_at_world_to_camera(eye, torch.zeros(3)) for eye in eyes]


def render(scene: dict, world_to_camera: torch.Tensor, k: torch.Tensor, width: int, height: int) -> np.ndarray:
    cameras = Cameras(world_to_camera[None].float(), k[None].float(), width, height)
    image = SingleProcessRenderer("torch")(scene, cameras, 0, torch.full((3,), 0.3)).views[0].image
    return image.clamp(0, 1).numpy().astype(np.float64)


def forward_distort(model: str, coefficients: list[float], x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """COLMAP's camera models, from undistorted to distorted normalised coordinates."""
    if model.endswith("FISHEYE"):  # SIMPLE_RADIAL_FISHEYE: k1; RADIAL_FISHEYE: k1 k2; OPENCV_FISHEYE: k1..k4
        k1, k2, k3, k4 = [*coefficients, 0.0, 0.0, 0.0][:4]
        r = np.hypot(x, y)
        theta = np.arctan(r)
        theta_d = theta * (1 + k1 * theta**2 + k2 * theta**4 + k3 * theta**6 + k4 * theta**8)
        scale = np.where(r > 1e-12, theta_d / np.maximum(r, 1e-12), 1.0)
        return x * scale, y * scale
    k = dict(zip(["k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6"], [0.0] * 8, strict=True))
    names = {"SIMPLE_RADIAL": ["k1"], "RADIAL": ["k1", "k2"], "OPENCV": ["k1", "k2", "p1", "p2"],
             "FULL_OPENCV": ["k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6"]}[model]
    k.update(zip(names, coefficients, strict=True))
    r2 = x * x + y * y
    numerator = 1 + k["k1"] * r2 + k["k2"] * r2**2 + k["k3"] * r2**3
    radial = numerator / (1 + k["k4"] * r2 + k["k5"] * r2**2 + k["k6"] * r2**3)
    xd = x * radial + 2 * k["p1"] * x * y + k["p2"] * (r2 + 2 * x * x)
    yd = y * radial + k["p1"] * (r2 + 2 * y * y) + 2 * k["p2"] * x * y
    return xd, yd


def undistort_points(model: str, coefficients: list[float], xd: np.ndarray, yd: np.ndarray) -> tuple[np.ndarray, ...]:
    """Invert ``forward_distort`` by Newton's method (finite-difference Jacobian); checked to converge."""
    x, y, h = xd.copy(), yd.copy(), 1e-6
    for _ in range(30):
        fx, fy = forward_distort(model, coefficients, x, y)
        ax, ay = (np.subtract(*pair) / (2 * h) for pair in zip(forward_distort(model, coefficients, x + h, y),
                                                                  forward_distort(model, coefficients, x - h, y),
                                                                  strict=True))
        bx, by = (np.subtract(*pair) / (2 * h) for pair in zip(forward_distort(model, coefficients, x, y + h),
                                                                  forward_distort(model, coefficients, x, y - h),
                                                                  strict=True))
        rx, ry, det = xd - fx, yd - fy, ax * by - bx * ay
        x, y = x + (by * rx - bx * ry) / det, y + (ax * ry - ay * rx) / det
    fx, fy = forward_distort(model, coefficients, x, y)
    assert np.abs(fx - xd).max() < 1e-9 and np.abs(fy - yd).max() < 1e-9
    return x, y


def bilinear(image: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sample [H, W, 3] at continuous pixel coordinates with centres at +0.5 (must be inside)."""
    px, py = u - 0.5, v - 0.5
    assert px.min() >= 0 and py.min() >= 0 and px.max() <= image.shape[1] - 1 and py.max() <= image.shape[0] - 1
    x0 = np.minimum(np.floor(px).astype(int), image.shape[1] - 2)
    y0 = np.minimum(np.floor(py).astype(int), image.shape[0] - 2)
    ax, ay = (px - x0)[..., None], (py - y0)[..., None]
    top = image[y0, x0] * (1 - ax) + image[y0, x0 + 1] * ax
    bottom = image[y0 + 1, x0] * (1 - ax) + image[y0 + 1, x0 + 1] * ax
    return top * (1 - ay) + bottom * ay


def distorted_image(scene: dict, pose: torch.Tensor, model: str, coefficients: list[float]) -> np.ndarray:
    """What the distorted camera (FOCAL, CX, CY, coefficients) sees, from a supersampled pinhole render."""
    width, height = int(WIDTH * MARGIN * SUPERSAMPLE), int(HEIGHT * MARGIN * SUPERSAMPLE)
    focal = FOCAL * SUPERSAMPLE
    k = torch.tensor([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1.0]])
    reference = render(scene, pose, k, width, height)
    u, v = np.meshgrid(np.arange(WIDTH) + 0.5, np.arange(HEIGHT) + 0.5)
    x, y = undistort_points(model, coefficients, (u - CX) / FOCAL, (v - CY) / FOCAL)
    return bilinear(reference, x * focal + width / 2, y * focal + height / 2)


def colmap_params(model: str, coefficients: list[float]) -> list[float]:
    if model in ("SIMPLE_RADIAL", "RADIAL", "SIMPLE_RADIAL_FISHEYE", "RADIAL_FISHEYE"):
        return [FOCAL, CX, CY, *coefficients]
    return [FOCAL, FOCAL, CX, CY, *coefficients]


def quaternion_wxyz(rotation: np.ndarray) -> list[float]:
    w = math.sqrt(max(1e-12, 1 + rotation[0, 0] + rotation[1, 1] + rotation[2, 2])) / 2
    return [w, (rotation[2, 1] - rotation[1, 2]) / (4 * w), (rotation[0, 2] - rotation[2, 0]) / (4 * w),
            (rotation[1, 0] - rotation[0, 1]) / (4 * w)]


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


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


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

"""A synthetic COLMAP capture written to disk the way a real one is: JPEG files, a text model, 3-D points.

Views orbit the demo scene (``splatting/data/demo_scene.py``) at golden-angle azimuths, so the first N
views of any capture spread all around it. Each is ray-cast at ``render_width`` (ray casting a 1080p view
takes seconds), upsampled to the capture size, given sensor noise (so the JPEGs have a real capture's
size and decoding cost, about 0.3 MB at 1080p), and saved at quality 90. :func:`prefix_capture` makes a
capture folder of the first N views that shares the image files (a symbolic link), so 100, 1000 and 3000
views cost the disk of the largest one.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.spatial.transform import Rotation

from lightning_grendel.splatting.cameras import Cameras
from lightning_grendel.splatting.data.demo_scene import cameras_on_sphere, render_views, surface_points

GOLDEN_ANGLE = math.pi * (3 - math.sqrt(5))
NOISE_FRAMES = 4  # sensor noise is drawn for a few frames and rolled per view: drawing it per view is slower
RENDER_BATCH = 16  # views ray-cast together
DONE = "capture.json"


def orbit(count: int, width: int, height: int, seed: int = 0) -> Cameras:
    """``count`` cameras looking at the demo scene: golden-angle azimuths, jittered elevation and distance."""
    generator = torch.Generator().manual_seed(seed)
    jitter = torch.rand(count, 2, generator=generator, dtype=torch.float64)
    azimuth = GOLDEN_ANGLE * torch.arange(count, dtype=torch.float64)
    return cameras_on_sphere(azimuth, 20 + 35 * jitter[:, 0], 3.6 + 0.8 * jitter[:, 1], width, height)


def write_capture(folder: Path, views: int, width: int = 1920, height: int = 1080, render_width: int = 320,
                  points: int = 50_000, seed: int = 0) -> Path:
    """``folder/images/*.jpg`` and ``folder/sparse/0/*.txt``; reused when ``folder`` already holds it, resumed
    (views on disk kept) when a run writing it was interrupted."""
    spec = {"views": views, "width": width, "height": height, "render_width": render_width, "points": points,
            "seed": seed}
    marker = folder / DONE
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return folder
    (folder / "images").mkdir(parents=True, exist_ok=True)  # views already written are kept (an interrupted run)
    cameras = orbit(views, width, height, seed)
    render_height = round(height * render_width / width)
    small = orbit(views, render_width, render_height, seed)
    rng = np.random.default_rng(seed)
    low, low_batch = None, -1
    noise = rng.normal(0.0, 3.0, (NOISE_FRAMES, height, width, 3)).astype(np.float32)
    names = [folder / "images" / f"{index:05d}.jpg" for index in range(views)]
    for index in range(views):
        grain_shift = int(rng.integers(height))  # drawn for every view, written or not: the same noise on resuming
        if names[index].is_file():
            continue
        if index // RENDER_BATCH != low_batch:
            low_batch = index // RENDER_BATCH
            first = low_batch * RENDER_BATCH
            low = render_views(small[torch.arange(first, min(first + RENDER_BATCH, views))], supersample=1)
        up = torch.nn.functional.interpolate(low[index % RENDER_BATCH][None].permute(0, 3, 1, 2).float(),
                                             size=(height, width), mode="bilinear", align_corners=False)
        up = up[0].permute(1, 2, 0).numpy()
        grain = np.roll(noise[index % NOISE_FRAMES], grain_shift, axis=0)
        pixels = np.clip(up + grain, 0, 255).astype(np.uint8)
        partial = names[index].with_suffix(".tmp.jpg")
        Image.fromarray(pixels).save(partial, quality=90)
        partial.replace(names[index])  # a killed run leaves no truncated view behind
    shutil.rmtree(folder / "sparse", ignore_errors=True)
    _write_model(folder / "sparse" / "0", cameras, small, points, seed)
    marker.write_text(json.dumps(spec))
    return folder


def _write_model(model: Path, cameras: Cameras, small: Cameras, points: int, seed: int) -> None:
    model.mkdir(parents=True)
    k = cameras.intrinsics[0].double()
    (model / "cameras.txt").write_text(
        f"1 PINHOLE {cameras.width} {cameras.height} {k[0, 0]:.9g} {k[1, 1]:.9g} {k[0, 2]:.9g} {k[1, 2]:.9g}\n")
    lines = []
    for index in range(len(cameras)):
        w2c = cameras.world_to_camera[index].double().numpy()
        x, y, z, w = Rotation.from_matrix(w2c[:3, :3]).as_quat()
        t = w2c[:3, 3]
        lines.append(f"{index + 1} {w:.12g} {x:.12g} {y:.12g} {z:.12g} {t[0]:.12g} {t[1]:.12g} {t[2]:.12g} 1 "
                     f"{index:05d}.jpg\n\n")
    (model / "images.txt").write_text("".join(lines))
    xyz, rgb = surface_points(small, points, torch.Generator().manual_seed(seed))
    rgb = (rgb * 255).round().to(torch.uint8)
    (model / "points3D.txt").write_text("".join(
        f"{i + 1} {p[0]:.7g} {p[1]:.7g} {p[2]:.7g} {c[0]} {c[1]} {c[2]} 0.5\n"
        for i, (p, c) in enumerate(zip(xyz.tolist(), rgb.tolist(), strict=True))))


def prefix_capture(capture: Path, folder: Path, views: int) -> Path:
    """A capture of the first ``views`` views of ``capture``: its own model, the same image files."""
    model = folder / "sparse" / "0"
    if not model.is_dir():
        model.mkdir(parents=True)
        source = capture / "sparse" / "0"
        shutil.copy(source / "cameras.txt", model)
        shutil.copy(source / "points3D.txt", model)
        lines = (source / "images.txt").read_text().splitlines(keepends=True)
        (model / "images.txt").write_text("".join(lines[: 2 * views]))
        (folder / "images").symlink_to((capture / "images").resolve(), target_is_directory=True)
    return folder


def disk_bytes(folder: Path) -> int:
    """Bytes of the regular files under ``folder`` (links not followed)."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())

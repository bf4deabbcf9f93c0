"""Tiny COLMAP captures written to disk (noise images, one camera), for the image loading and caching tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 48, 36


def noise_image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def write_colmap_capture(root: Path, model: str = "SIMPLE_RADIAL", params: str = "40 24.3 17.8 -0.2",
                         count: int = 3, suffix: str = ".png") -> list[Path]:
    """``count`` noise images seen by one camera of ``model`` (poses differ a little); their paths."""
    model_dir = root / "sparse" / "0"
    model_dir.mkdir(parents=True)
    (root / "images").mkdir()
    records, paths = [], []
    for index in range(count):
        path = root / "images" / f"im{index}{suffix}"
        noise_image(index).save(path)
        paths.append(path)
        records.append(f"{index + 1} 1 0 0 0 0 0 {4 + index} 1 {path.name}\n")
    (model_dir / "images.txt").write_text("\n".join(records) + "\n")
    (model_dir / "cameras.txt").write_text(f"1 {model} {WIDTH} {HEIGHT} {params}\n")
    (model_dir / "points3D.txt").write_text("1 0 0 0 128 128 128 0.5\n")
    return paths


def damage_cache_entry(entry: Path, damage: str) -> None:
    """Spoil a decoded-image cache file the ways a crash or a stray write can: ``truncated``, ``garbage``
    (not an array) or anything else (a valid array of another shape and dtype)."""
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:100])
    elif damage == "garbage":
        entry.write_bytes(b"not an array")
    else:
        np.save(entry, np.zeros((2, 2), np.float32))

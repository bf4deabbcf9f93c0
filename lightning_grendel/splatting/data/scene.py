"""In-memory scene shared by every reader: decoded uint8 images per split, their cameras, initial points.

Readers (COLMAP, Blender, the demo scene) all produce a ``SceneData`` so that the DataModule serves them
the same way. Images are kept as uint8 (a quarter of the float32 memory) and converted per item; a large
capture's splits stream them instead (:class:`~.streamed.StreamedImages`, decoded on demand).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lightning_grendel.splatting.cameras import Cameras

if TYPE_CHECKING:
    from lightning_grendel.splatting.data.streamed import StreamedImages


@dataclass
class ImageSplit:
    """One split: ``images`` uint8 [N, H, W, C] (C = 3, or 4 with straight alpha; held, or streamed) and N
    cameras."""

    images: Tensor | StreamedImages
    cameras: Cameras
    names: list[str]

    def __post_init__(self) -> None:
        n, h, w, c = self.images.shape
        if self.images.dtype != torch.uint8 or c not in (3, 4):
            raise ValueError(f"ImageSplit: images must be uint8 [N,H,W,3|4], got {self.images.dtype} {c}")
        camera_size = (self.cameras.width, self.cameras.height)
        if len(self.cameras) != n or len(self.names) != n or camera_size != (w, h):
            raise ValueError(
                f"ImageSplit: {n} images of {w}x{h} but {len(self.cameras)} cameras of "
                f"{self.cameras.width}x{self.cameras.height} and {len(self.names)} names"
            )

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class SceneData:
    """Train/val/test splits plus initial Gaussian centres [P, 3] and colours [P, 3] in [0, 1]."""

    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    points: Tensor
    colors: Tensor


def resized_size(width: int, height: int, image_width: int | None, downscale: float) -> tuple[int, int]:
    """Target size for a target width (aspect kept) or a downscale factor; at most one of them is set."""
    if image_width is not None and downscale != 1.0:
        raise ValueError(f"give either image_width ({image_width}) or downscale ({downscale}), not both")
    if image_width is not None:
        if image_width <= 0:
            raise ValueError(f"image_width must be positive, got {image_width}")
        return image_width, max(1, round(height * image_width / width))
    if downscale <= 0:
        raise ValueError(f"downscale must be positive, got {downscale}")
    return max(1, round(width / downscale)), max(1, round(height / downscale))


def scale_intrinsics(intrinsics: Tensor, old_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """Intrinsics for a resized image; pixel centres at x + 0.5 make this a plain per-axis scale."""
    scaled = intrinsics.clone()
    scaled[..., 0, :] *= new_size[0] / old_size[0]
    scaled[..., 1, :] *= new_size[1] / old_size[1]
    return scaled


def load_image(
    path: Path, mode: str, expected_size: tuple[int, int], expected_from: str, size: tuple[int, int]
) -> np.ndarray:
    """Decode ``path`` to uint8 [H, W, C] in PIL ``mode`` ("RGB" or "RGBA"), area-resampled to ``size``.

    The decoded size must be ``expected_size`` (stated by ``expected_from``): one dataset, one image size.
    Pillow resizes RGBA in premultiplied form, so transparent pixels do not bleed colour into edges.
    """
    try:
        with Image.open(path) as image:
            _check_size(path, image.size, expected_size, expected_from)
            image = image.convert(mode)
            if image.size != size:
                image = image.resize(size, Image.Resampling.BOX)
            return np.asarray(image, dtype=np.uint8).copy()
    except (OSError, SyntaxError, EOFError) as error:  # Pillow's errors for truncated or corrupt files
        raise OSError(f"{path}: cannot decode image: {error}") from error


def check_image_size(path: Path, expected_size: tuple[int, int], expected_from: str) -> None:
    """Read only the header of ``path`` and check its size (a streamed scene checks every file up front)."""
    try:
        with Image.open(path) as image:
            size = image.size
    except (OSError, SyntaxError, EOFError) as error:
        raise OSError(f"{path}: cannot decode image: {error}") from error
    _check_size(path, size, expected_size, expected_from)


def _check_size(path: Path, size: tuple[int, int], expected_size: tuple[int, int], expected_from: str) -> None:
    if size != expected_size:
        raise ValueError(
            f"{path}: image is {size[0]}x{size[1]} but {expected_from} is "
            f"{expected_size[0]}x{expected_size[1]}; all images of one dataset must share one size"
        )

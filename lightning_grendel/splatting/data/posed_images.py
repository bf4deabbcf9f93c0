"""Photos of real cameras to image splits: one lens per camera, undistorted, one image size, resized.

COLMAP models and nerfstudio ``transforms.json`` files both come down to a list of images, each with a
camera (a COLMAP camera model: lens parameters and the size it was calibrated at) and a world-to-camera
pose in OpenCV axes. :func:`load_splits` turns that list into the train and test :class:`ImageSplit`.

Downscaled folders (Mip-NeRF 360's and ``ns-process-data``'s ``images_2``, ``images_4``, ``images_8``):
:func:`use_downscaled` swaps each image for its copy in the folder and scales its camera by the actual
size ratio on each axis (``round(W / d)`` is not ``W / d``), so nothing is resized on the fly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from lightning_grendel.splatting.cameras import Cameras
from lightning_grendel.splatting.data import undistort
from lightning_grendel.splatting.data.image_cache import DecodedImageCache
from lightning_grendel.splatting.data.scene import ImageSplit, check_image_size, resized_size, scale_intrinsics
from lightning_grendel.splatting.data.streamed import ImageSource, ImageStorage

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".JPG", ".JPEG", ".PNG")


@dataclass(frozen=True)
class LensCamera:
    """A camera in COLMAP's terms (``id``, ``model``, size, ``params``) for readers other than COLMAP's."""

    id: int
    model: str
    width: int
    height: int
    params: tuple[float, ...]


@dataclass(frozen=True)
class PosedImage:
    name: str  # as the dataset lists it (sorting, splits, output file names)
    path: Path
    camera: undistort.CameraLike
    world_to_camera: Tensor  # [4, 4] float64, OpenCV axes


def downscaled_folder(images_dir: Path, downscale: float, image_width: int | None) -> Path | None:
    """``<images_dir>_<d>`` beside ``images_dir`` when ``downscale`` is an integer d > 1 and it exists."""
    if image_width is not None or downscale <= 1 or downscale != int(downscale):
        return None
    folder = images_dir.with_name(f"{images_dir.name}_{int(downscale)}")
    return folder if folder.is_dir() else None


def scaled_camera(camera: undistort.CameraLike, size: tuple[int, int], where: Path | str) -> LensCamera:
    """``camera`` for its images resized to ``size``: fx, cx by the width ratio, fy, cy by the height ratio.

    The two ratios differ slightly after rounding, so one-focal models become their two-focal equivalent
    (SIMPLE_RADIAL -> OPENCV, RADIAL_FISHEYE -> OPENCV_FISHEYE, ...); distortion acts on normalised
    coordinates and does not change.
    """
    lens = undistort.camera_lens(camera, where)
    sx, sy = size[0] / camera.width, size[1] / camera.height
    coefficients = tuple(lens.opencv_coefficients().tolist())
    if lens.fisheye:
        model = "OPENCV_FISHEYE"
    elif not lens.distorted:
        model, coefficients = "PINHOLE", ()
    else:
        model = "FULL_OPENCV" if len(coefficients) == 8 else "OPENCV"
    params = (lens.fx * sx, lens.fy * sy, lens.cx * sx, lens.cy * sy, *coefficients)
    return LensCamera(camera.id, model, size[0], size[1], params)


def _find(folder: Path, name: str) -> Path | None:
    exact = folder / Path(name).name
    if exact.is_file():
        return exact
    matches = [folder / (Path(name).stem + suffix) for suffix in IMAGE_SUFFIXES]
    found = [path for path in matches if path.is_file()]
    return found[0] if len(found) == 1 else None


def use_downscaled(images: list[PosedImage], folder: Path, where: Path | str) -> list[PosedImage]:
    """The same images read from the downscaled ``folder`` (same name, or same stem), cameras scaled to fit."""
    paths = []
    for image in images:
        path = _find(folder, image.path.name)
        if path is None:
            raise FileNotFoundError(f"{where}: {folder} holds no copy of {image.path.name} (looked for the same "
                                    "name and the same stem with another image extension)")
        paths.append(path)
    with Image.open(paths[0]) as first:
        size = first.size
    log.info("reading %d images from %s (%dx%d) instead of resizing on the fly", len(images), folder, *size)
    scaled = {image.camera.id: scaled_camera(image.camera, size, where) for image in images}
    return [replace(image, path=path, camera=scaled[image.camera.id])
            for image, path in zip(images, paths, strict=True)]


def load_splits(
    images: list[PosedImage], is_test: list[bool], where: Path | str, image_width: int | None = None,
    downscale: float = 1.0, cache: DecodedImageCache | None = None, storage: ImageStorage | None = None,
) -> tuple[ImageSplit, ImageSplit]:
    """(train, test) splits of ``images``; every camera's images share the first image's size.

    Distorted cameras are undistorted (one remap table per camera, all cropped to one common size), then
    every image is area-resampled to the ``image_width`` / ``downscale`` size with its intrinsics. ``cache``
    keeps undistorted images on disk when they are held in memory; ``storage`` says whether they are held
    or streamed (then its own disk cache keeps every decoded image, undistorted ones included).
    """
    storage = storage or ImageStorage()
    first = images[0].camera
    source_size = (first.width, first.height)
    cameras = {image.camera.id: image.camera for image in images}
    undistortions = undistort.make_undistortions(list(cameras.values()), where)  # one remap table per camera
    undistorted_size = undistortions[first.id].size
    size = resized_size(*undistorted_size, image_width, downscale)
    reference = f"camera {first.id} of the first image {images[0].name}"
    stream = storage.streams(len(images) * size[0] * size[1] * 3)
    cache = None if stream else cache  # streamed images have their own disk cache

    def make_split(selected: list[PosedImage]) -> ImageSplit:
        sources = []
        for image in selected:
            camera = image.camera
            if (camera.width, camera.height) != source_size:
                raise ValueError(
                    f"{where}: image {image.name} has camera {camera.id} of {camera.width}x{camera.height} "
                    f"but {reference} is {source_size[0]}x{source_size[1]}; one dataset, one image size"
                )
            if not image.path.is_file():
                raise FileNotFoundError(f"{where}: image {image.name} is registered but {image.path} is missing")
            undistortion = undistortions[camera.id]
            if stream:
                check_image_size(image.path, source_size, reference)
            decode = partial(undistort.load_undistorted, image.path, undistortion, source_size, reference, size, cache)
            sources.append(ImageSource(image.path, f"RGB {undistortion.describe()} source={source_size}", decode))
        intrinsics = torch.stack([undistortions[image.camera.id].intrinsics for image in selected])
        split_cameras = Cameras(
            torch.stack([image.world_to_camera for image in selected]).to(torch.float32),
            scale_intrinsics(intrinsics, undistorted_size, size).to(torch.float32),
            size[0],
            size[1],
        )
        pixels = storage.split_images(sources, (size[1], size[0], 3), stream)
        return ImageSplit(pixels, split_cameras, [image.name for image in selected])

    test = make_split([image for image, held_out in zip(images, is_test, strict=True) if held_out])
    train = make_split([image for image, held_out in zip(images, is_test, strict=True) if not held_out])
    return train, test

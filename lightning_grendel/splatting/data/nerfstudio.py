"""nerfstudio ``transforms.json`` reader: what ``ns-process-data``, Polycam and Record3D exports write.

Conventions, as nerfstudio's own data parser reads them:

- ``frames[i].transform_matrix`` is camera-to-world in OpenGL camera axes (x right, y up, looking along
  -z), like Blender's; ``frames[i].file_path`` is relative to the JSON file's folder.
- Intrinsics ``fl_x``, ``fl_y``, ``cx``, ``cy``, ``w``, ``h`` and distortion ``k1`` .. ``k4``, ``p1``,
  ``p2`` are given once at the top level (one camera; ns-process-data, Record3D) or in every frame
  (Polycam); a top-level value applies to every frame. ``cx``, ``cy`` put pixel centres at +0.5, like
  COLMAP and the rasterizer. Distortion is all top level or all per frame, as in nerfstudio.
- ``camera_model``: ``OPENCV`` (the default), ``PINHOLE``, ``SIMPLE_PINHOLE``: nerfstudio's perspective
  model, radial ``1 + k1 r^2 + k2 r^4 + k3 r^6 + k4 r^8`` plus OpenCV's tangential ``p1``, ``p2``;
  ``OPENCV_FISHEYE``: ``theta_d = theta (1 + k1 theta^2 + .. + k4 theta^8)``. Distorted cameras are
  undistorted like COLMAP's (:mod:`.undistort`); a perspective ``k4`` (no OpenCV equivalent), fisheye
  ``p1``/``p2`` (nerfstudio ignores them) and other models (``EQUIRECTANGULAR`` ...) are refused.
- ``ply_file_path``: initial points (``x y z`` and optional ``red green blue``) in the same world as the
  poses: ns-process-data writes them through ``applied_transform`` (which maps the original COLMAP world
  to this one and so is not applied again). Without it, random points fill the cube around the cameras.
- ``train_filenames`` / ``test_filenames`` (or ``val_filenames``) choose the splits when present, else
  every ``test_every``-th frame by file name is held out, as for COLMAP.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from plyfile import PlyData, PlyParseError

from lightning_grendel.splatting.cameras import opengl_to_opencv_world_to_camera
from lightning_grendel.splatting.data.image_cache import DecodedImageCache
from lightning_grendel.splatting.data.posed_images import (
    LensCamera,
    PosedImage,
    downscaled_folder,
    load_splits,
    use_downscaled,
)
from lightning_grendel.splatting.data.scene import SceneData
from lightning_grendel.splatting.data.streamed import ImageStorage
from lightning_grendel.splatting.data.validate import (
    check_camera_parameters,
    check_points,
    check_rigid_pose,
    matrix_from_json,
)

INTRINSICS = ("fl_x", "fl_y", "cx", "cy", "w", "h")
DISTORTION = ("k1", "k2", "k3", "k4", "p1", "p2")
PERSPECTIVE_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE")
MODELS = (*PERSPECTIVE_MODELS, "OPENCV_FISHEYE")
TRANSFORMS_FILE = "transforms.json"


class NerfstudioFormatError(ValueError):
    """A ``transforms.json`` that is unreadable, incomplete or uses a camera this package cannot render."""


def _number(value: Any, source: Path, frame: str, key: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise NerfstudioFormatError(f"{source}: {frame}: {key} must be a number, got {value!r:.40}") from error
    if not math.isfinite(number):
        raise NerfstudioFormatError(f"{source}: {frame}: {key} must be finite, got {number}")
    return number


def _camera(meta: dict, frame: dict, source: Path, label: str, model: str) -> tuple:
    """(COLMAP model name, width, height, params) of one frame: OPENCV, FULL_OPENCV, OPENCV_FISHEYE, PINHOLE."""
    values = {}
    for key in INTRINSICS:
        if key not in meta and key not in frame:
            raise NerfstudioFormatError(f"{source}: {label}: no {key} (give it at the top level or in every frame)")
        values[key] = _number(meta[key] if key in meta else frame[key], source, label, key)
    holder = meta if any(key in meta for key in ("k1", "k2", "k3", "p1", "p2")) else frame
    k1, k2, k3, k4, p1, p2 = (_number(holder.get(key, 0.0), source, label, key) for key in DISTORTION)
    width, height = int(values["w"]), int(values["h"])
    if width != values["w"] or height != values["h"] or width <= 0 or height <= 0:
        raise NerfstudioFormatError(f"{source}: {label}: w and h must be positive whole numbers, got "
                                    f"{values['w']} x {values['h']}")
    pinhole = (values["fl_x"], values["fl_y"], values["cx"], values["cy"])
    if model == "OPENCV_FISHEYE":
        if p1 or p2:
            raise NerfstudioFormatError(f"{source}: {label}: p1/p2 given for an OPENCV_FISHEYE camera, which has no "
                                        "tangential terms (nerfstudio ignores them); remove them")
        return "OPENCV_FISHEYE", width, height, (*pinhole, k1, k2, k3, k4)
    if k4:
        raise NerfstudioFormatError(f"{source}: {label}: k4 = {k4} of a perspective camera (nerfstudio's r^8 term) "
                                    "has no OpenCV equivalent to undistort with")
    if k3:
        return "FULL_OPENCV", width, height, (*pinhole, k1, k2, p1, p2, k3, 0.0, 0.0, 0.0)
    if k1 or k2 or p1 or p2:
        return "OPENCV", width, height, (*pinhole, k1, k2, p1, p2)
    return "PINHOLE", width, height, pinhole


def read_transforms(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NerfstudioFormatError(f"{path}: not a readable JSON file ({type(error).__name__}: {error})") from error
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list) or not meta["frames"]:
        raise NerfstudioFormatError(f"{path}: no 'frames' list (a nerfstudio transforms file has one)")
    model = meta.get("camera_model", "OPENCV")
    if model not in MODELS:
        raise NerfstudioFormatError(f"{path}: camera_model {model!r} is not supported; supported: "
                                    f"{', '.join(MODELS)} (undistorted to pinholes on load)")
    return meta


def _images(meta: dict, path: Path) -> list[PosedImage]:
    model = meta.get("camera_model", "OPENCV")
    root = path.parent
    cameras: dict[tuple, LensCamera] = {}
    images = []
    for index, frame in enumerate(meta["frames"]):
        if not isinstance(frame, dict) or "file_path" not in frame or "transform_matrix" not in frame:
            raise NerfstudioFormatError(f"{path}: frame {index} needs a file_path and a transform_matrix")
        name = Path(str(frame["file_path"])).as_posix().removeprefix("./")
        label = f"frame {index} ({name})"
        key = _camera(meta, frame, path, label, model)
        if key not in cameras:
            cameras[key] = LensCamera(len(cameras) + 1, *key)
        camera = cameras[key]
        check_camera_parameters(camera.model, camera.params, path, label)
        camera_to_world = matrix_from_json(frame["transform_matrix"], path, label)
        check_rigid_pose(camera_to_world, path, label)
        world_to_camera = opengl_to_opencv_world_to_camera(camera_to_world).to(torch.float64)
        images.append(PosedImage(name, root / name, camera, world_to_camera))
    return sorted(images, key=lambda image: image.name)


def _held_out(meta: dict, images: list[PosedImage], path: Path, test_every: int) -> list[bool]:
    listed = meta.get("test_filenames", meta.get("val_filenames"))
    if "train_filenames" not in meta or listed is None:
        return [i % test_every == 0 for i in range(len(images))]
    names = {Path(str(name)).as_posix().removeprefix("./") for name in listed}
    unknown = names - {image.name for image in images}
    if unknown:
        raise NerfstudioFormatError(f"{path}: test_filenames lists frames that are not in 'frames': "
                                    f"{sorted(unknown)[:3]}")
    held_out = [image.name in names for image in images]
    if all(held_out) or not any(held_out):
        raise NerfstudioFormatError(f"{path}: test_filenames must hold some frames but not all")
    return held_out


def _points(meta: dict, path: Path, images: list[PosedImage], count: int, seed: int) -> tuple:
    if "ply_file_path" in meta:
        ply_path = path.parent / str(meta["ply_file_path"])
        try:
            vertex = PlyData.read(str(ply_path))["vertex"]
            xyz = np.stack([np.asarray(vertex[axis], np.float64) for axis in "xyz"], axis=1)
        except (OSError, PlyParseError, KeyError, ValueError) as error:
            raise NerfstudioFormatError(f"{path}: ply_file_path {ply_path} is not a readable point cloud with "
                                        f"x, y, z ({type(error).__name__}: {error})") from error
        if len(xyz) == 0:
            raise NerfstudioFormatError(f"{path}: ply_file_path {ply_path} holds no points")
        check_points(xyz, ply_path)
        names = {prop.name for prop in vertex.properties}
        if {"red", "green", "blue"} <= names:
            rgb = np.stack([np.asarray(vertex[c], np.float64) for c in ("red", "green", "blue")], axis=1) / 255.0
        else:
            rgb = np.full_like(xyz, 0.5)
        return torch.from_numpy(xyz).float(), torch.from_numpy(rgb).float()
    centres = torch.stack([torch.linalg.inv(image.world_to_camera)[:3, 3] for image in images]).float()
    low, high = centres.min(0).values, centres.max(0).values
    middle, half = (low + high) / 2, float((high - low).max()) / 2 or 1.0
    generator = torch.Generator().manual_seed(seed)
    points = middle + (torch.rand(count, 3, generator=generator) * 2 - 1) * half
    return points, torch.rand(count, 3, generator=generator)


def load_nerfstudio_scene(
    root: str | Path, image_width: int | None = None, downscale: float = 1.0, test_every: int = 8,
    num_init_points: int = 100_000, seed: int = 0, cache: DecodedImageCache | None = None,
    storage: ImageStorage | None = None,
) -> SceneData:
    """Posed images of ``root/transforms.json`` (or the JSON file ``root``), undistorted, split, with points;
    ``cache`` and ``storage`` as in :func:`~.posed_images.load_splits`.

    With an integer ``downscale`` d and an ``images_<d>`` folder beside the images (ns-process-data's
    ``--num-downscales``), its images are read instead of resizing on the fly.
    """
    root = Path(root)
    path = root if root.suffix == ".json" else root / TRANSFORMS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: nerfstudio transforms file not found")
    meta = read_transforms(path)
    images = _images(meta, path)
    held_out = _held_out(meta, images, path, test_every)
    folder = downscaled_folder(images[0].path.parent, downscale, image_width)
    if folder is not None:
        images, downscale = use_downscaled(images, folder, path), 1.0
    train, test = load_splits(images, held_out, path, image_width, downscale, cache, storage)
    points, colors = _points(meta, path, images, num_init_points, seed)
    return SceneData(train, test, test, points, colors)

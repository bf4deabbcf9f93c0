"""COLMAP sparse-model reader (binary and text) and the posed-image scene built from it.

Binary files are little-endian (layout in the COLMAP docs, ``src/colmap/scene/reconstruction_io.cc``).
Pinhole cameras load as they are; SIMPLE_RADIAL, RADIAL, OPENCV, FULL_OPENCV, OPENCV_FISHEYE,
SIMPLE_RADIAL_FISHEYE and RADIAL_FISHEYE are undistorted at load time (:mod:`.undistort`); other models
(FOV, THIN_PRISM_FISHEYE) are rejected with the ``colmap
image_undistorter`` command that fixes them. Every parse error names the file and
what is wrong, so a truncated download is told apart from an unsupported capture.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_grendel.splatting.data import undistort
from lightning_grendel.splatting.data.image_cache import DecodedImageCache
from lightning_grendel.splatting.data.posed_images import PosedImage, downscaled_folder, load_splits, use_downscaled
from lightning_grendel.splatting.data.scene import SceneData
from lightning_grendel.splatting.data.streamed import ImageStorage
from lightning_grendel.splatting.data.validate import check_colmap_model

# COLMAP model id -> (name, number of parameters).
CAMERA_MODELS: dict[int, tuple[str, int]] = {
    0: ("SIMPLE_PINHOLE", 3),
    1: ("PINHOLE", 4),
    2: ("SIMPLE_RADIAL", 4),
    3: ("RADIAL", 5),
    4: ("OPENCV", 8),
    5: ("OPENCV_FISHEYE", 8),
    6: ("FULL_OPENCV", 12),
    7: ("FOV", 5),
    8: ("SIMPLE_RADIAL_FISHEYE", 4),
    9: ("RADIAL_FISHEYE", 5),
    10: ("THIN_PRISM_FISHEYE", 12),
}
_PARAM_COUNTS = dict(CAMERA_MODELS.values())


class ColmapFormatError(ValueError):
    """A COLMAP file is truncated, corrupt or inconsistent."""


class UnsupportedCameraModelError(ValueError):
    """A camera uses a model with distortion (or otherwise not a plain pinhole)."""


@dataclass(frozen=True)
class ColmapCamera:
    id: int
    model: str
    width: int
    height: int
    params: tuple[float, ...]

    def intrinsics(self) -> Tensor:
        """3x3 pinhole part; COLMAP puts pixel centres at (x + 0.5, y + 0.5) like the rasterizer."""
        lens = undistort.camera_lens(self, f"camera {self.id}")
        return torch.tensor([[lens.fx, 0.0, lens.cx], [0.0, lens.fy, lens.cy], [0.0, 0.0, 1.0]], dtype=torch.float64)


@dataclass(frozen=True)
class ColmapImage:
    id: int
    qvec: tuple[float, float, float, float]  # world-to-camera rotation, wxyz
    tvec: tuple[float, float, float]  # world-to-camera translation
    camera_id: int
    name: str
    num_points2d: int

    def world_to_camera(self) -> Tensor:
        """4x4 world-to-camera in OpenCV axes (COLMAP's own convention), float64."""
        w, x, y, z = torch.tensor(self.qvec, dtype=torch.float64) / np.linalg.norm(self.qvec)
        rotation = torch.stack(
            [
                torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)]),
                torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)]),
                torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]),
            ]
        )
        matrix = torch.eye(4, dtype=torch.float64)
        matrix[:3, :3] = rotation
        matrix[:3, 3] = torch.tensor(self.tvec, dtype=torch.float64)
        return matrix


@dataclass
class ColmapPoints:
    """3D points: ``ids`` int64 [P], ``xyz`` float64 [P, 3], ``rgb`` uint8 [P, 3], ``errors`` float64 [P],
    ``track_lengths`` int64 [P]."""

    ids: np.ndarray
    xyz: np.ndarray
    rgb: np.ndarray
    errors: np.ndarray
    track_lengths: np.ndarray


@dataclass
class ColmapModel:
    path: Path
    cameras: dict[int, ColmapCamera]
    images: dict[int, ColmapImage]
    points: ColmapPoints


def _checked_camera(path: Path, camera: ColmapCamera) -> ColmapCamera:
    if camera.model not in undistort.SUPPORTED_MODELS:
        raise UnsupportedCameraModelError(
            f"{path}: camera {camera.id} uses the {camera.model} model; only "
            f"{', '.join(undistort.SUPPORTED_MODELS)} are supported. Undistort the images first with "
            "`colmap image_undistorter --image_path images --input_path sparse/0 --output_path undistorted` "
            "and use the `undistorted` folder as the dataset path."
        )
    if camera.width <= 0 or camera.height <= 0:
        raise ColmapFormatError(f"{path}: camera {camera.id} has size {camera.width}x{camera.height}")
    return camera


class _BinaryReader:
    """Little-endian cursor over a whole file whose errors say which file, which record and where."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = path.read_bytes()
        self.offset = 0

    def _need(self, size: int, what: str) -> None:
        if self.offset + size > len(self.data):
            raise ColmapFormatError(
                f"{self.path}: truncated: expected {size} bytes for {what} at offset {self.offset}, "
                f"but the file ends at {len(self.data)}"
            )

    def read(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize("<" + fmt)
        self._need(size, what)
        values = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += size
        return values

    def read_count(self, record_size: int, what: str) -> int:
        """The u64 record count of the header, checked against the file size before anything is allocated."""
        (count,) = self.read("Q", f"the {what} count")
        if count * record_size > len(self.data) - self.offset:
            raise ColmapFormatError(
                f"{self.path}: truncated or corrupt: the header announces {count} {what}s of at least "
                f"{record_size} bytes, but only {len(self.data) - self.offset} bytes follow"
            )
        return count

    def skip(self, size: int, what: str) -> None:
        self._need(size, what)
        self.offset += size

    def read_name(self, what: str) -> str:
        end = self.data.find(b"\0", self.offset)
        if end < 0:
            raise ColmapFormatError(f"{self.path}: truncated: no NUL-terminated {what} at offset {self.offset}")
        try:
            name = self.data[self.offset : end].decode("utf-8")
        except UnicodeDecodeError as error:
            raise ColmapFormatError(f"{self.path}: {what} at offset {self.offset} is not UTF-8") from error
        self.offset = end + 1
        return name

    def finish(self) -> None:
        if self.offset != len(self.data):
            raise ColmapFormatError(
                f"{self.path}: {len(self.data) - self.offset} unexpected bytes after the last record "
                f"(offset {self.offset}): corrupt file or wrong record count"
            )


def read_cameras_binary(path: Path) -> dict[int, ColmapCamera]:
    reader = _BinaryReader(path)
    count = reader.read_count(24, "camera")
    cameras = {}
    for index in range(count):
        camera_id, model_id, width, height = reader.read("iiQQ", f"camera {index + 1} of {count}")
        if model_id not in CAMERA_MODELS:
            raise ColmapFormatError(f"{path}: camera {camera_id} has unknown model id {model_id}")
        model, num_params = CAMERA_MODELS[model_id]
        params = reader.read(f"{num_params}d", f"the {model} parameters of camera {camera_id}")
        cameras[camera_id] = _checked_camera(path, ColmapCamera(camera_id, model, width, height, params))
    reader.finish()
    return cameras


def read_images_binary(path: Path) -> dict[int, ColmapImage]:
    reader = _BinaryReader(path)
    count = reader.read_count(73, "image")
    images = {}
    for index in range(count):
        image_id, *pose, camera_id = reader.read("i7di", f"image {index + 1} of {count}")
        name = reader.read_name(f"name of image {image_id}")
        (num_points2d,) = reader.read("Q", f"the 2D point count of image {image_id}")
        reader.skip(24 * num_points2d, f"the {num_points2d} 2D points of image {image_id}")
        images[image_id] = ColmapImage(image_id, tuple(pose[:4]), tuple(pose[4:]), camera_id, name, num_points2d)
    reader.finish()
    return images


def read_points3d_binary(path: Path) -> ColmapPoints:
    reader = _BinaryReader(path)
    count = reader.read_count(51, "point")
    ids = np.empty(count, np.int64)
    xyz = np.empty((count, 3), np.float64)
    rgb = np.empty((count, 3), np.uint8)
    errors = np.empty(count, np.float64)
    track_lengths = np.empty(count, np.int64)
    for index in range(count):
        point_id, x, y, z, r, g, b, error, track_length = reader.read("Q3d3BdQ", f"point {index + 1} of {count}")
        reader.skip(8 * track_length, f"the track of point {point_id}")
        ids[index], xyz[index], rgb[index] = point_id, (x, y, z), (r, g, b)
        errors[index], track_lengths[index] = error, track_length
    reader.finish()
    return ColmapPoints(ids, xyz, rgb, errors, track_lengths)


def _data_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) for every line that is not a comment; blank lines are kept (images.txt)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ColmapFormatError(f"{path}: not a UTF-8 text file") from error
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if not line.startswith("#")]


def _parse(path: Path, number: int, fields: list[str], kinds: list[type], what: str) -> list:
    if len(fields) < len(kinds):
        raise ColmapFormatError(f"{path}:{number}: expected {len(kinds)} fields for {what}, got {len(fields)}")
    try:
        return [kind(field) for kind, field in zip(kinds, fields[: len(kinds)], strict=True)]
    except ValueError as error:
        raise ColmapFormatError(f"{path}:{number}: malformed {what}: {error}") from error


def read_cameras_text(path: Path) -> dict[int, ColmapCamera]:
    cameras = {}
    for number, line in _data_lines(path):
        if not line:
            continue
        fields = line.split()
        camera_id, model, width, height = _parse(path, number, fields, [int, str, int, int], "a camera")
        if model not in _PARAM_COUNTS:
            raise ColmapFormatError(f"{path}:{number}: camera {camera_id} has unknown model {model}")
        num_params = _PARAM_COUNTS[model]
        if len(fields) != 4 + num_params:
            raise ColmapFormatError(
                f"{path}:{number}: camera {camera_id} ({model}) needs {num_params} parameters, got {len(fields) - 4}"
            )
        params = tuple(_parse(path, number, fields[4:], [float] * num_params, f"camera {camera_id} parameters"))
        cameras[camera_id] = _checked_camera(path, ColmapCamera(camera_id, model, width, height, params))
    return cameras


def read_images_text(path: Path) -> dict[int, ColmapImage]:
    """Two lines per image; the second (2D points) may be empty, so blank lines are not skipped blindly."""
    lines = _data_lines(path)
    images = {}
    position = 0
    while position < len(lines):
        number, line = lines[position]
        position += 1
        if not line:
            continue
        kinds = [int] + [float] * 7 + [int, str]
        image_id, *pose, camera_id, name = _parse(path, number, line.split(maxsplit=9), kinds, "an image")
        if position >= len(lines):
            raise ColmapFormatError(f"{path}: truncated: no 2D-point line after image {image_id} (line {number})")
        points_number, points_line = lines[position]
        position += 1
        num_fields = len(points_line.split())
        if num_fields % 3:
            raise ColmapFormatError(
                f"{path}:{points_number}: 2D points of image {image_id} must be (X, Y, POINT3D_ID) triples, "
                f"got {num_fields} values"
            )
        images[image_id] = ColmapImage(image_id, tuple(pose[:4]), tuple(pose[4:]), camera_id, name, num_fields // 3)
    return images


def read_points3d_text(path: Path) -> ColmapPoints:
    rows = []
    for number, line in _data_lines(path):
        if not line:
            continue
        fields = line.split()
        kinds = [int, float, float, float, int, int, int, float]
        values = _parse(path, number, fields, kinds, "a 3D point")
        track = len(fields) - len(kinds)
        if track % 2 or not all(0 <= c <= 255 for c in values[4:7]):
            raise ColmapFormatError(f"{path}:{number}: malformed 3D point {values[0]} (colour or track)")
        rows.append((values, track // 2))
    return ColmapPoints(
        np.array([v[0] for v, _ in rows], np.int64),
        np.array([v[1:4] for v, _ in rows], np.float64).reshape(-1, 3),
        np.array([v[4:7] for v, _ in rows], np.uint8).reshape(-1, 3),
        np.array([v[7] for v, _ in rows], np.float64),
        np.array([t for _, t in rows], np.int64),
    )


def find_model_dir(path: str | Path) -> Path:
    """The folder with the model files: ``path/sparse/0``, ``path/sparse`` or ``path`` itself."""
    path = Path(path)
    for folder in (path / "sparse" / "0", path / "sparse", path):
        if (folder / "cameras.bin").is_file() or (folder / "cameras.txt").is_file():
            return folder
    raise FileNotFoundError(f"{path}: no COLMAP model (cameras.bin or cameras.txt) in sparse/0, sparse or {path}")


def read_model(path: str | Path) -> ColmapModel:
    """Read a model folder (or a dataset folder holding one); binary files are preferred over text."""
    folder = find_model_dir(path)
    ext = ".bin" if (folder / "cameras.bin").is_file() else ".txt"
    files = {name: folder / f"{name}{ext}" for name in ("cameras", "images", "points3D")}
    if ext == ".bin":
        readers = (read_cameras_binary, read_images_binary, read_points3d_binary)
    else:
        readers = (read_cameras_text, read_images_text, read_points3d_text)
    parsed = []
    for reader, file in zip(readers, files.values(), strict=True):
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing from the COLMAP model in {folder}")
        parsed.append(reader(file))
    cameras, images, points = parsed
    check_colmap_model(cameras, images, points, files)
    for image in images.values():
        if image.camera_id not in cameras:
            raise ColmapFormatError(f"{files['images']}: image {image.name} refers to missing camera {image.camera_id}")
    return ColmapModel(folder, cameras, images, points)


def _find_images_dir(root: Path, model_dir: Path) -> Path:
    for folder in (root / "images", model_dir.parent / "images", model_dir.parent.parent / "images"):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"{root}: no images/ folder next to the COLMAP model {model_dir}")


def load_colmap_scene(
    root: str | Path, image_width: int | None = None, downscale: float = 1.0, test_every: int = 8,
    cache: DecodedImageCache | None = None, storage: ImageStorage | None = None,
) -> SceneData:
    """Posed images sorted by name; every ``test_every``-th one (from the first) is held out as test and val.

    Initial points are the model's 3D points with their colours. ``cache`` keeps undistorted images of
    distorted cameras on disk between runs (None: undistort every load); ``storage`` holds the images in
    memory (default) or streams them. With an integer ``downscale`` d
    and an ``images_<d>`` folder beside ``images/``, its images are read instead of resizing on the fly.
    """
    root = Path(root)
    model = read_model(root)
    images_dir = _find_images_dir(root, model.path)
    entries = sorted(model.images.values(), key=lambda image: image.name)
    if not entries:
        raise ColmapFormatError(f"{model.path}: the model has no registered images")
    if len(model.points.ids) == 0:
        raise ColmapFormatError(f"{model.path}: the model has no 3D points to initialise Gaussians from")

    images = [PosedImage(image.name, images_dir / image.name, model.cameras[image.camera_id], image.world_to_camera())
              for image in entries]
    folder = downscaled_folder(images_dir, downscale, image_width)
    if folder is not None:
        images, downscale = use_downscaled(images, folder, model.path), 1.0
    is_test = [i % test_every == 0 for i in range(len(images))]
    train, test = load_splits(images, is_test, model.path, image_width, downscale, cache, storage)
    points = torch.from_numpy(model.points.xyz).to(torch.float32)
    colors = torch.from_numpy(model.points.rgb).to(torch.float32) / 255.0
    return SceneData(train, test, test, points, colors)

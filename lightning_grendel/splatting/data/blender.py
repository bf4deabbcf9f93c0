"""NeRF-synthetic ("Blender") reader: ``transforms_{train,val,test}.json`` plus RGBA PNGs.

Each transforms file holds ``camera_angle_x`` (horizontal field of view) and ``frames`` with a
``file_path`` without extension (".png" is appended) and a camera-to-world ``transform_matrix`` in
OpenGL axes. Images keep their straight alpha; the dataset composites them over the chosen background.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from lightning_grendel.splatting.cameras import (
    Cameras,
    focal_from_fov,
    intrinsics_matrix,
    opengl_to_opencv_world_to_camera,
)
from lightning_grendel.splatting.data.scene import (
    ImageSplit,
    SceneData,
    check_image_size,
    load_image,
    resized_size,
    scale_intrinsics,
)
from lightning_grendel.splatting.data.streamed import ImageSource, ImageStorage
from lightning_grendel.splatting.data.validate import check_field_of_view, check_rigid_pose, matrix_from_json

SPLITS = ("train", "val", "test")
INIT_BOX_HALF_WIDTH = 1.3  # random initial points in [-1.3, 1.3]^3, as in 3DGS for NeRF-synthetic


def _read_transforms(path: Path) -> tuple[float, list[tuple[Path, torch.Tensor]]]:
    """``camera_angle_x`` and (image path, camera-to-world) per frame; missing images are an error."""
    try:
        meta = json.loads(path.read_text())
        fov_x = float(meta["camera_angle_x"])
        frames = [(frame["file_path"], frame["transform_matrix"]) for frame in meta["frames"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        kind = type(error).__name__
        raise ValueError(f"{path}: not a NeRF-synthetic transforms file ({kind}: {error})") from error
    if not frames:
        raise ValueError(f"{path}: 'frames' is empty")
    check_field_of_view(fov_x, path)
    result = []
    for index, (file_path, matrix) in enumerate(frames):
        image_path = path.parent / (file_path + ".png")
        if not image_path.is_file():
            raise FileNotFoundError(f"{path}: frame {index} points at a missing image {image_path}")
        frame = f"frame {index} ({file_path})"
        c2w = matrix_from_json(matrix, path, frame)
        check_rigid_pose(c2w, path, frame)
        result.append((image_path, c2w))
    return fov_x, result


def load_blender_scene(
    root: str | Path,
    image_width: int | None = None,
    downscale: float = 1.0,
    num_init_points: int = 100_000,
    seed: int = 0,
    storage: ImageStorage | None = None,
) -> SceneData:
    """Read every split under ``root``; without ``transforms_val.json`` the test split doubles as val.
    ``storage`` holds the images in memory (default) or streams them."""
    root = Path(root)
    transforms = {split: root / f"transforms_{split}.json" for split in SPLITS}
    for split in ("train", "test"):
        if not transforms[split].is_file():
            raise FileNotFoundError(f"{transforms[split]}: NeRF-synthetic transforms file not found")
    if not transforms["val"].is_file():
        transforms["val"] = transforms["test"]

    parsed = {split: _read_transforms(path) for split, path in transforms.items()}
    first_image = parsed["train"][1][0][0]
    with Image.open(first_image) as image:
        source_size = image.size
    size = resized_size(*source_size, image_width, downscale)
    storage = storage or ImageStorage()
    stream = storage.streams(sum(len(frames) for _, frames in parsed.values()) * size[0] * size[1] * 4)

    splits = {}
    for split, (fov_x, frames) in parsed.items():
        focal = focal_from_fov(fov_x, source_size[0])
        intrinsics = intrinsics_matrix(focal, focal, source_size[0] / 2, source_size[1] / 2)
        intrinsics = scale_intrinsics(intrinsics, source_size, size)
        reference = f"the first image {first_image}"
        if stream:
            for path, _ in frames:
                check_image_size(path, source_size, reference)
        sources = [ImageSource(path, f"RGBA source={source_size}", partial(load_image, path, "RGBA", source_size,
                                                                         reference, size)) for path, _ in frames]
        images = storage.split_images(sources, (size[1], size[0], 4), stream)
        cameras = Cameras(
            torch.stack([opengl_to_opencv_world_to_camera(c2w) for _, c2w in frames]),
            intrinsics.expand(len(frames), 3, 3).clone(),
            size[0],
            size[1],
        )
        names = [str(path.relative_to(root)) for path, _ in frames]
        splits[split] = ImageSplit(images, cameras, names)

    generator = torch.Generator().manual_seed(seed)
    points = (torch.rand(num_init_points, 3, generator=generator) * 2 - 1) * INIT_BOX_HALF_WIDTH
    colors = torch.rand(num_init_points, 3, generator=generator)
    return SceneData(splits["train"], splits["val"], splits["test"], points, colors)

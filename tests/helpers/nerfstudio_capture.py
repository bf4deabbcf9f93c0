"""colmap_blocks written the way ns-process-data's ``colmap_to_json`` writes a capture (a ground truth for
the nerfstudio loader, and the ``capture/`` folder the docs' nerfstudio command trains on)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from plyfile import PlyData, PlyElement

from lightning_grendel.splatting.data.colmap import read_model


def write_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray | None) -> None:
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")] + ([(c, "u1") for c in ("red", "green", "blue")]
                                                           if rgb is not None else [])
    vertices = np.zeros(len(xyz), fields)
    for i, axis in enumerate("xyz"):
        vertices[axis] = xyz[:, i]
    if rgb is not None:
        for i, c in enumerate(("red", "green", "blue")):
            vertices[c] = rgb[:, i]
    PlyData([PlyElement.describe(vertices, "vertex")], text=True).write(str(path))


def write_capture_from_colmap(source: Path, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """OpenGL camera-to-world poses in a world with y and z swapped and z negated, that map recorded as
    ``applied_transform`` and ``sparse_pc.ply`` already moved through it; images linked, not copied.

    Returns:
        The 4x4 world map and the moved points.
    """
    model = read_model(source)
    applied = np.eye(4)[[0, 2, 1, 3]]
    applied[2] *= -1
    camera = next(iter(model.cameras.values()))
    fx, fy, cx, cy = camera.params
    meta = {"camera_model": "OPENCV", "fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy, "w": camera.width,
            "h": camera.height, "applied_transform": applied[:3].tolist(), "ply_file_path": "sparse_pc.ply",
            "frames": []}
    for image in model.images.values():
        c2w = applied @ np.linalg.inv(image.world_to_camera().numpy())
        c2w[:3, 1:3] *= -1
        meta["frames"].append({"file_path": f"images/{image.name}", "transform_matrix": c2w.tolist()})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").symlink_to(source / "images")
    (folder / "transforms.json").write_text(json.dumps(meta))
    points = model.points.xyz @ applied[:3, :3].T
    write_ply(folder / "sparse_pc.ply", points.astype(np.float32), model.points.rgb)
    return applied, points

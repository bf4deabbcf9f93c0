"""Frames to a GIF (Pillow) or an MP4 (OpenCV's bundled encoder, MPEG-4 part 2), written atomically
(with the mode the umask gives, as the PLY writer's files)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from lightning_grendel._atomic import as_if_created


def write_video(path: Path, frames: list[np.ndarray], fps: float) -> None:
    """Write uint8 [H, W, 3] ``frames``; the format follows the suffix (``.gif`` or ``.mp4``)."""
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise ValueError(f"{path}: video must end in .gif or .mp4")
    if not frames:
        raise ValueError(f"{path}: no frames to write")
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=suffix)
    os.close(handle)
    try:
        if suffix == ".gif":
            images = [Image.fromarray(frame) for frame in frames]
            images[0].save(temporary, format="GIF", save_all=True, append_images=images[1:],
                           duration=round(1000 / fps), loop=0)
        else:
            _write_mp4(Path(temporary), frames, fps)
        as_if_created(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _write_mp4(path: Path, frames: list[np.ndarray], fps: float) -> None:
    import cv2

    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"{path}: OpenCV has no MP4 encoder here; write a GIF instead (--video-format gif)")
    try:
        for frame in frames:
            writer.write(np.ascontiguousarray(frame[..., ::-1]))  # OpenCV wants BGR
    finally:
        writer.release()

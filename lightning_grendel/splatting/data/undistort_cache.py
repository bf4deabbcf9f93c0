"""On-disk cache of undistorted images, so the next run (fit, then test, then render) skips decode + remap.

One ``.npy`` file per image, named by a hash of everything the pixels depend on: the image file (its
resolved path, modification time and size), the camera's lens and the undistortion's output intrinsics
and crop, the output size, OpenCV's version and this cache's format version. A changed image or camera
gets a new name, so nothing stale is ever read; old files stay until the folder is deleted. Files are
written to a temporary name and renamed into place (atomic on POSIX), so ranks loading the same dataset
at once and a run killed mid-write never leave a half-written entry. A file that does not read back as
the expected uint8 image is recomputed and rewritten with a warning; a folder that cannot be written is
warned about once and the cache is left unused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lightning-grendel/undistorted``, or ``~/.cache/...`` without the variable."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightning-grendel" / "undistorted"


class UndistortCache:
    """Reads and writes undistorted images under ``folder`` (see the module docstring for the key)."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = default_cache_dir() if folder is None else Path(folder).expanduser()
        self.writable = True

    def key(self, image: Path, camera: str, size: tuple[int, int]) -> str:
        """Hex digest naming ``image`` undistorted as ``camera`` describes, at ``size`` (width, height)."""
        stat = image.stat()
        parts = [FORMAT_VERSION, cv2.__version__, str(image.resolve()), stat.st_mtime_ns, stat.st_size, camera,
                 list(size)]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def image(self, image: Path, camera: str, size: tuple[int, int], make: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached pixels [H, W, 3] of ``image``, or ``make()``'s, which are then stored."""
        entry = self.folder / f"{self.key(image, camera, size)}.npy"
        if entry.is_file():
            cached = self._read(entry, size)
            if cached is not None:
                return cached
        pixels = make()
        self._write(entry, pixels)
        return pixels

    def _read(self, entry: Path, size: tuple[int, int]) -> np.ndarray | None:
        try:
            pixels = np.load(entry, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            log.warning("undistortion cache file %s cannot be read (%s): recomputing it", entry, error)
            return None
        if pixels.dtype != np.uint8 or pixels.shape != (size[1], size[0], 3):
            log.warning("undistortion cache file %s holds a %s %s array, not uint8 %s: recomputing it", entry,
                        pixels.dtype, pixels.shape, (size[1], size[0], 3))
            return None
        return pixels

    def _write(self, entry: Path, pixels: np.ndarray) -> None:
        if not self.writable:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            descriptor, name = tempfile.mkstemp(dir=self.folder, prefix=f".{entry.stem}.", suffix=".tmp")
        except OSError as error:
            self._disable(error)
            return
        partial = Path(name)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                np.save(handle, pixels, allow_pickle=False)
            os.replace(partial, entry)
        except BaseException as error:
            partial.unlink(missing_ok=True)
            if not isinstance(error, OSError):
                raise
            self._disable(error)

    def _disable(self, error: OSError) -> None:
        self.writable = False
        log.warning("undistortion cache folder %s is not writable (%s): undistorting without a cache "
                    "(set the datamodule's undistort_cache_dir, or undistort_cache=false)", self.folder, error)

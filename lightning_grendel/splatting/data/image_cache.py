"""On-disk cache of decoded images: undistorted images for the next run, and streamed images for every
rank of a host.

Two users: the in-memory path keeps the undistorted images of distorted cameras, so the next run (fit,
then test, then render) skips decode + remap; the streamed path (:mod:`.streamed`) keeps every decoded
image and reads it back memory-mapped, so the ranks of one host share one copy in the page cache.

One ``.npy`` file per image, named by a hash of everything the pixels depend on: the image file (its
resolved path, modification time and size), how it was decoded (the camera's lens, the undistortion's
output intrinsics and crop), the output size, OpenCV's version and this cache's format version. A changed
image or camera gets a new name, so nothing stale is ever read; old files stay until the folder is deleted.
Files are written to a temporary name and renamed into place (atomic on POSIX), so ranks loading the same
dataset at once and a run killed mid-write never leave a half-written entry; while one process makes an
entry it holds a byte-range lock on the folder's ``.locks`` file (released by the kernel if it dies), so
the other ranks of the host wait for it instead of decoding the same image again. A file that does not
read back as the expected uint8 image is recomputed and rewritten with a warning; a folder that cannot be
written, or has less free space than the entry plus a reserve, is warned about once and the cache is left
unused (the images are then held in memory).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LOCK_FILE = ".locks"
FREE_SPACE_RESERVE = 1 << 30  # never fill the disk: keep 1 GiB free beside the cache


@functools.cache
def npy_header(shape: tuple[int, int, int]) -> bytes:
    """The header ``np.save`` writes before a C-ordered uint8 array of ``shape`` (format 1.0)."""
    buffer = io.BytesIO()
    header = {"descr": "|u1", "fortran_order": False, "shape": tuple(int(side) for side in shape)}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def default_cache_dir(kind: str = "undistorted") -> Path:
    """``$XDG_CACHE_HOME/lightning-grendel/<kind>``, or ``~/.cache/...`` without the variable."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightning-grendel" / kind


class DecodedImageCache:
    """Reads and writes decoded images under ``folder`` (see the module docstring for the key)."""

    def __init__(self, folder: str | Path | None = None, kind: str = "undistorted") -> None:
        self.folder = default_cache_dir(kind) if folder is None else Path(folder).expanduser()
        self.writable = True
        self._disabling = threading.Lock()  # the prefetch thread and the step may both fail to write
        self._locks: tuple[int, int] | None = None  # (pid, descriptor) of the lock file

    def key(self, image: Path, camera: str, size: tuple[int, int]) -> str:
        """Hex digest naming ``image`` decoded as ``camera`` describes, at ``size`` (width, height)."""
        stat = image.stat()
        parts = [FORMAT_VERSION, cv2.__version__, str(image.resolve()), stat.st_mtime_ns, stat.st_size, camera,
                 list(size)]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def image(
        self, image: Path, camera: str, size: tuple[int, int], make: Callable[[], np.ndarray], channels: int = 3,
        mmap: bool = False,
    ) -> np.ndarray:
        """The cached pixels [H, W, channels] of ``image``, or ``make()``'s, which are then stored.

        With ``mmap`` the entry is mapped copy-on-write rather than read: its pages are the page cache's,
        shared by every process of the host that maps the same entry.
        """
        shape = (size[1], size[0], channels)
        entry = self.folder / f"{self.key(image, camera, size)}.npy"
        cached = self._read(entry, shape, mmap)
        if cached is not None:
            return cached
        with self._lock(entry.stem):
            cached = self._read(entry, shape, mmap, quiet=True)  # made by another process while we waited
            if cached is not None:
                return cached
            pixels = make()
            written = self._write(entry, pixels)
        mapped = self._read(entry, shape, mmap=True, quiet=True) if written and mmap else None
        return pixels if mapped is None else mapped  # mapped: the host's shared pages, not a private copy

    def _read(self, entry: Path, shape: tuple[int, int, int], mmap: bool, quiet: bool = False) -> np.ndarray | None:
        """The entry's pixels, or None when it is missing or is not the ``.npy`` of a uint8 ``shape`` array.

        Not ``np.load``: it parses the header with ``ast.literal_eval``, and CPython 3.11's AST conversion
        keeps its recursion depth in interpreter-wide state, so two threads parsing at once (the prefetch
        thread and the step, or pytest compiling a module) fail with ``SystemError: AST constructor recursion
        depth mismatch``. The header np.save writes for this shape is known, so it is compared byte for byte.
        """
        if not entry.is_file():
            return None
        header = npy_header(shape)
        try:
            with open(entry, "rb") as handle:
                found = handle.read(len(header))
            size = entry.stat().st_size
            if found != header or size != len(header) + math.prod(shape):
                raise ValueError(f"not the .npy file of a uint8 {shape} array ({size} bytes)")
            if mmap:
                return np.memmap(entry, np.uint8, "c", offset=len(header), shape=shape)
            return np.fromfile(entry, np.uint8, offset=len(header)).reshape(shape)
        except (OSError, ValueError) as error:
            if not quiet:
                log.warning("image cache file %s cannot be read (%s): recomputing it", entry, error)
            return None

    @contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        """Hold this entry's byte of the folder's lock file (other processes making it wait; threads of one
        process do not exclude each other, which is harmless: writes are atomic).

        The kernel's deadlock check on record locks counts a process, not a thread: with the prefetch thread
        and the main thread each waiting on a byte another rank holds while that rank waits on one of theirs,
        it reports EDEADLK although no thread holds one byte while waiting for another. Waiting again is right.
        """
        descriptor = self._lock_descriptor()
        if descriptor is None:
            yield
            return
        offset = int(key[:15], 16)
        while True:
            try:
                fcntl.lockf(descriptor, fcntl.LOCK_EX, 1, offset)
                break
            except OSError as error:
                if error.errno != errno.EDEADLK:
                    raise
                time.sleep(0.01)
        try:
            yield
        finally:
            fcntl.lockf(descriptor, fcntl.LOCK_UN, 1, offset)

    def _lock_descriptor(self) -> int | None:
        if not self.writable:
            return None
        if self._locks is None or self._locks[0] != os.getpid():  # re-opened in a forked child
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                descriptor = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as error:
                self._disable(error)
                return None
            self._locks = (os.getpid(), descriptor)
        return self._locks[1]

    def _write(self, entry: Path, pixels: np.ndarray) -> bool:
        """Store ``pixels`` as ``entry``; False when the cache is (or just became) unusable."""
        if not self.writable:
            return False
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.folder).free
            if free < pixels.nbytes + FREE_SPACE_RESERVE:
                raise OSError(f"only {free / 2**30:.1f} GiB free")
            descriptor, name = tempfile.mkstemp(dir=self.folder, prefix=f".{entry.stem}.", suffix=".tmp")
        except OSError as error:
            self._disable(error)
            return False
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
            return False
        return True

    def __getstate__(self) -> dict:  # spawned DataLoader workers and ranks get the folder, not the lock
        state = dict(self.__dict__)
        state.pop("_disabling")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._disabling = threading.Lock()

    def _disable(self, error: OSError) -> None:
        with self._disabling:
            if not self.writable:  # the other thread's write failed first and said so
                return
            self.writable = False
        log.warning("image cache folder %s is not writable (%s): decoding without a disk cache, images held in "
                    "memory (set the datamodule's undistort_cache_dir / image_cache_dir)", self.folder, error)

"""Read any Gaussian scene file and write one of :data:`FORMATS`, picking the module that knows the format.

:func:`read_gaussians` tells the format from the file's content (the extension only for ``.splat``,
which has no header); :func:`write_gaussians` writes atomically.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from torch import Tensor

from lightning_grendel.splatting.formats.common import GaussianFileError
from lightning_grendel.splatting.formats.compressed_ply import write_compressed_ply
from lightning_grendel.splatting.formats.splat import read_splat, write_splat
from lightning_grendel.splatting.formats.spz import read_spz, write_spz
from lightning_grendel.splatting.ply import load_ply, save_ply

Format = Literal["ply", "spz", "splat", "ply_compressed"]
FORMATS: tuple[str, ...] = ("ply", "spz", "splat", "ply_compressed")
EXTENSIONS = {"ply": ".ply", "spz": ".spz", "splat": ".splat", "ply_compressed": ".compressed.ply"}


def detect_format(path: Path) -> Literal["ply", "spz", "splat"]:
    """``ply`` (standard or compressed), ``spz`` or ``splat``, from the first bytes of the file."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError as error:
        raise GaussianFileError(f"{path}: cannot read: {error.strerror or error}") from error
    if head.startswith(b"ply"):
        return "ply"
    if head[:2] == b"\x1f\x8b" or head == b"NGSP":
        return "spz"
    if path.suffix.lower() == ".splat":
        return "splat"
    raise GaussianFileError(f"{path}: not a Gaussian scene file this reads (a 3DGS PLY, compressed PLY, SPZ or "
                            ".splat file)")


def read_gaussians(path: str | os.PathLike) -> dict[str, Tensor]:
    """Raw 3DGS parameters (float32, CPU) of a standard or compressed PLY, an SPZ or a ``.splat`` file."""
    path = Path(path)
    if not path.is_file():
        raise GaussianFileError(f"{path}: no such file")
    readers: dict[str, Callable[[Path], dict[str, Tensor]]] = {"ply": load_ply, "spz": read_spz, "splat": read_splat}
    return readers[detect_format(path)](path)


def write_gaussians(path: str | os.PathLike, params: dict[str, Tensor], format: Format,
                    antialiased: bool = False) -> None:
    """Write ``params`` as ``format`` to ``path`` atomically; ``antialiased`` is recorded where SPZ has a flag."""
    if format == "ply":
        save_ply(path, params)
    elif format == "spz":
        write_spz(path, params, antialiased=antialiased)
    elif format == "splat":
        write_splat(path, params)
    elif format == "ply_compressed":
        write_compressed_ply(path, params)
    else:
        raise GaussianFileError(f"{path}: unknown format {format!r}; choose one of {', '.join(FORMATS)}")

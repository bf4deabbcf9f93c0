"""antimatter15's ``.splat``: 32 bytes a Gaussian, no header, no view-dependent colour; the web viewers'
oldest common format.

Each record (little-endian): position 3 x float32, scale 3 x float32 (activated, not log), colour RGBA
4 x uint8 (``0.5 + SH_C0 * dc`` and the sigmoid of the opacity, times 255) and the unit wxyz quaternion
4 x uint8 (``q * 128 + 128``). Records are sorted by size times opacity, largest first, as antimatter15's
converter does (viewers stream the big ones first). The SH bands above 0 are dropped on writing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from torch import Tensor

from lightning_grendel._atomic import atomic_write
from lightning_grendel.splatting.formats.common import (
    GaussianFileError,
    as_params,
    checked_for_writing,
    logit_of_unorm8,
    normalised_quats,
    sigmoid,
    warn_clamped,
)
from lightning_grendel.splatting.sh import SH_C0

log = logging.getLogger(__name__)

RECORD = np.dtype([("position", "<f4", 3), ("scale", "<f4", 3), ("rgba", "u1", 4), ("rotation", "u1", 4)])


def importance_order(params: dict[str, np.ndarray]) -> np.ndarray:
    """Record order: volume proxy (exp of the summed log scales) times opacity, descending, ties by index."""
    importance = np.exp(params["scales"].astype(np.float64).sum(axis=1)) * sigmoid(params["opacities"])
    return np.argsort(-importance, kind="stable")


def write_splat(path: str | os.PathLike, params: dict[str, Tensor]) -> None:
    """Write ``params`` as a ``.splat`` file atomically (degree-0 colour only)."""
    path = Path(path)
    p = checked_for_writing(path, params, "write_splat")
    if p["shN"].shape[1]:
        log.warning("%s: .splat stores no view-dependent colour; SH bands 1+ are dropped", path)
    order = importance_order(p)
    n = len(order)
    records = np.empty(n, RECORD)
    records["position"] = p["means"][order]
    records["scale"] = np.exp(p["scales"][order].astype(np.float64))
    rgb = 0.5 + SH_C0 * p["sh0"][order].reshape(n, 3).astype(np.float64)
    warn_clamped(".splat", "colour", rgb, 0.0, 1.0)
    alpha = sigmoid(p["opacities"][order])[:, None]
    records["rgba"] = np.clip(np.round(np.concatenate([rgb, alpha], axis=1) * 255.0), 0, 255)
    quats = normalised_quats(p["quats"][order].astype(np.float64))
    records["rotation"] = np.clip(np.round(quats * 128.0 + 128.0), 0, 255)
    with atomic_write(path) as handle:
        handle.write(records.tobytes())


def read_splat(path: str | os.PathLike) -> dict[str, Tensor]:
    """Raw 3DGS parameters (SH degree 0) of a ``.splat`` file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise GaussianFileError(f"{path}: cannot read: {error.strerror or error}") from error
    if not raw or len(raw) % RECORD.itemsize:
        raise GaussianFileError(f"{path}: {len(raw)} bytes is not a whole number of 32-byte .splat records "
                                "(truncated, or another format)")
    records = np.frombuffer(raw, RECORD)
    n = len(records)
    scales = records["scale"].astype(np.float64)
    if not (scales > 0).all():
        bad = int((~(scales > 0)).any(axis=1).sum())
        raise GaussianFileError(f"{path}: {bad} of {n} records have a scale that is not positive: not a .splat file")
    quats = (records["rotation"].astype(np.float64) - 128.0) / 128.0
    arrays = {
        "means": records["position"],
        "scales": np.log(scales),
        "quats": normalised_quats(quats),
        "opacities": logit_of_unorm8(records["rgba"][:, 3]),
        "sh0": ((records["rgba"][:, :3] / 255.0 - 0.5) / SH_C0).reshape(n, 1, 3),
        "shN": np.zeros((n, 0, 3)),
    }
    return as_params(arrays, path)

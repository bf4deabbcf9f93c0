"""PlayCanvas / SuperSplat compressed PLY: 16 bytes a Gaussian plus one byte a SH coefficient.

Gaussians are sorted along a Morton (Z-order) curve and cut into chunks of 256. A ``chunk`` element holds
each chunk's float bounds (``min_x .. max_z``, ``min_scale_x .. max_scale_z`` on log scales clamped to
[-20, 20], ``min_r .. max_b`` on the base colour ``0.5 + SH_C0 * dc``). Each ``vertex`` holds four uint32:
position and log scale as 11/10/11-bit fractions of the chunk's range (x in the top bits), the
quaternion as its largest component's index (top 2 bits) and the other three as 10-bit fractions of
[-sqrt(1/2), sqrt(1/2)] (in ``rot_0..rot_3`` order, the largest made positive), and colour RGB as 8-bit
fractions of the chunk's range with the sigmoid of the opacity as the low byte. An ``sh`` element holds
the ``f_rest_*`` of the standard layout (channel-major) as ``(x / 8 + 0.5) * 256`` bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from plyfile import PlyData, PlyElement, PlyParseError
from torch import Tensor

from lightning_grendel._atomic import atomic_write
from lightning_grendel.splatting.formats.common import (
    GaussianFileError,
    as_params,
    checked_for_writing,
    logit_of_unorm8,
    normalised_quats,
    pack_smallest_three,
    sh_degree_of_rest,
    sigmoid,
    unorm,
    unpack_smallest_three,
    warn_clamped,
)
from lightning_grendel.splatting.sh import SH_C0

CHUNK = 256
BOUNDS = ("x", "y", "z", "scale_x", "scale_y", "scale_z", "r", "g", "b")
CHUNK_PROPERTIES = [f"min_{name}" for name in BOUNDS[:3]] + [f"max_{name}" for name in BOUNDS[:3]] + [
    f"min_{name}" for name in BOUNDS[3:6]] + [f"max_{name}" for name in BOUNDS[3:6]] + [
    f"min_{name}" for name in BOUNDS[6:]] + [f"max_{name}" for name in BOUNDS[6:]]
PACKED = ("packed_position", "packed_rotation", "packed_scale", "packed_color")
SCALE_CLAMP = 20.0
SH_RANGE = 8.0  # bytes cover [-4, 4)


def is_compressed_ply(ply: PlyData) -> bool:
    names = [element.name for element in ply.elements]
    return "chunk" in names and "vertex" in names and any(p.name == "packed_position" for p in ply["vertex"].properties)


def morton_order(means: np.ndarray) -> np.ndarray:
    """Indices sorting ``means`` along a 30-bit Morton curve over their bounding box (ties by index)."""
    low, high = means.min(axis=0), means.max(axis=0)
    cells = np.floor((means - low) / np.where(high > low, high - low, 1.0) * 1023.0).astype(np.uint64)
    code = np.zeros(len(means), np.uint64)
    for bit in range(10):
        for axis in range(3):
            code |= ((cells[:, axis] >> np.uint64(bit)) & np.uint64(1)) << np.uint64(3 * bit + 2 - axis)
    return np.argsort(code, kind="stable")


def _fraction(values: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    span = high - low
    t = np.where(span < 1e-5, 0.0, (values - low) / np.where(span < 1e-5, 1.0, span))
    return np.clip(t, 0.0, 1.0)


def _pack_111011(t: np.ndarray) -> np.ndarray:
    return unorm(t[:, 0], 11) << np.uint32(21) | unorm(t[:, 1], 10) << np.uint32(11) | unorm(t[:, 2], 11)


def _unpack_111011(packed: np.ndarray) -> np.ndarray:
    return np.stack([(packed >> 21 & 0x7FF) / 2047.0, (packed >> 11 & 0x3FF) / 1023.0, (packed & 0x7FF) / 2047.0], 1)


def _chunk_bounds(values: np.ndarray, chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-chunk min and max [chunks, 3] of ``values`` [N, 3] (the last chunk may be short)."""
    padded = np.concatenate([values, np.repeat(values[-1:], chunks * CHUNK - len(values), axis=0)])
    blocks = padded.reshape(chunks, CHUNK, 3)
    return blocks.min(axis=1), blocks.max(axis=1)


def write_compressed_ply(path: str | os.PathLike, params: dict[str, Tensor]) -> None:
    """Write ``params`` as a compressed PLY atomically, in Morton order."""
    path = Path(path)
    p = checked_for_writing(path, params, "write_compressed_ply")
    n = len(p["means"])
    if n == 0:
        raise GaussianFileError(f"write_compressed_ply: {path}: no Gaussians to write")
    order = morton_order(p["means"].astype(np.float64))
    p = {key: value[order].astype(np.float64) for key, value in p.items()}
    warn_clamped("compressed PLY", "log-scale", p["scales"], -SCALE_CLAMP, SCALE_CLAMP)
    warn_clamped("compressed PLY", "SH", p["shN"], -SH_RANGE / 2, SH_RANGE / 2 - SH_RANGE / 256)
    chunks = -(-n // CHUNK)
    row_chunk = np.arange(n) // CHUNK
    columns = {"position": p["means"], "scale": np.clip(p["scales"], -SCALE_CLAMP, SCALE_CLAMP),
               "color": 0.5 + SH_C0 * p["sh0"].reshape(n, 3)}
    bounds = {key: _chunk_bounds(value, chunks) for key, value in columns.items()}
    fractions = {key: _fraction(value, bounds[key][0][row_chunk], bounds[key][1][row_chunk])
                 for key, value in columns.items()}
    vertex = np.empty(n, [(name, "<u4") for name in PACKED])
    vertex["packed_position"] = _pack_111011(fractions["position"])
    vertex["packed_scale"] = _pack_111011(fractions["scale"])
    vertex["packed_rotation"] = pack_smallest_three(normalised_quats(p["quats"]), 10, signed=False)
    rgba = np.concatenate([fractions["color"], sigmoid(p["opacities"])[:, None]], axis=1)
    vertex["packed_color"] = sum(unorm(rgba[:, i], 8) << np.uint32(24 - 8 * i) for i in range(4))
    chunk = np.empty(chunks, [(name, "<f4") for name in CHUNK_PROPERTIES])
    for index, key in enumerate(("position", "scale", "color")):
        for axis in range(3):
            chunk[CHUNK_PROPERTIES[6 * index + axis]] = bounds[key][0][:, axis]
            chunk[CHUNK_PROPERTIES[6 * index + 3 + axis]] = bounds[key][1][:, axis]
    elements = [PlyElement.describe(chunk, "chunk"), PlyElement.describe(vertex, "vertex")]
    rest = p["shN"].transpose(0, 2, 1).reshape(n, -1)  # channel-major, like f_rest_* of the standard PLY
    if rest.shape[1]:
        sh = np.empty(n, [(f"f_rest_{i}", "u1") for i in range(rest.shape[1])])
        quantised = np.clip(np.trunc((rest / SH_RANGE + 0.5) * 256.0), 0, 255)
        for i in range(rest.shape[1]):
            sh[f"f_rest_{i}"] = quantised[:, i]
        elements.append(PlyElement.describe(sh, "sh"))
    ply = PlyData(elements, text=False, byte_order="<", comments=["Generated by lightning-grendel"])
    with atomic_write(path) as handle:
        ply.write(handle)


def _column(element, name: str, path: Path) -> np.ndarray:
    if name not in {prop.name for prop in element.properties}:
        raise GaussianFileError(f"{path}: compressed PLY {element.name} element has no '{name}' property")
    return np.asarray(element[name])


def decode_compressed_ply(ply: PlyData, path: str | os.PathLike) -> dict[str, Tensor]:
    """Raw 3DGS parameters of a parsed compressed PLY (file order)."""
    path = Path(path)
    vertex, chunk = ply["vertex"], ply["chunk"]
    n = vertex.count
    if n == 0 or chunk.count != -(-n // CHUNK):
        raise GaussianFileError(f"{path}: compressed PLY with {n} Gaussians needs {-(-n // CHUNK)} chunks, "
                                f"has {chunk.count}")
    row_chunk = np.arange(n) // CHUNK

    def ranged(prefix: str, names: tuple[str, ...], t: np.ndarray) -> np.ndarray:
        low = np.stack([_column(chunk, f"min_{prefix}{a}", path) for a in names], 1)[row_chunk].astype(np.float64)
        high = np.stack([_column(chunk, f"max_{prefix}{a}", path) for a in names], 1)[row_chunk].astype(np.float64)
        return low + (high - low) * t

    packed = {name: _column(vertex, name, path).astype(np.uint32) for name in PACKED}
    color = packed["packed_color"]
    rgb = np.stack([(color >> shift & 0xFF) / 255.0 for shift in (24, 16, 8)], 1)
    chunk_names = {prop.name for prop in chunk.properties}
    if "min_r" in chunk_names:  # older SuperSplat files store the colour without chunk bounds
        rgb = ranged("", ("r", "g", "b"), rgb)
    names = [element.name for element in ply.elements]
    if "sh" in names:
        count = len(ply["sh"].properties)
        degree = sh_degree_of_rest(count // 3) if count % 3 == 0 else None
        if degree is None or ply["sh"].count != n:
            raise GaussianFileError(f"{path}: compressed PLY sh element of {count} properties x {ply['sh'].count} "
                                    f"rows does not match an SH degree 1..3 for {n} Gaussians")
        raw = np.stack([_column(ply["sh"], f"f_rest_{i}", path) for i in range(count)], 1).astype(np.float64)
        unit = np.where(raw == 0, 0.0, np.where(raw == 255, 1.0, (raw + 0.5) / 256.0))
        rest = ((unit - 0.5) * SH_RANGE).reshape(n, 3, count // 3).transpose(0, 2, 1)
    else:
        rest = np.zeros((n, 0, 3))
    arrays = {
        "means": ranged("", ("x", "y", "z"), _unpack_111011(packed["packed_position"])),
        "scales": ranged("scale_", ("x", "y", "z"), _unpack_111011(packed["packed_scale"])),
        "quats": unpack_smallest_three(packed["packed_rotation"], 10, signed=False),
        "opacities": logit_of_unorm8(color & 0xFF),
        "sh0": ((rgb - 0.5) / SH_C0).reshape(n, 1, 3),
        "shN": rest,
    }
    return as_params(arrays, path)


def read_compressed_ply(path: str | os.PathLike) -> dict[str, Tensor]:
    """Raw 3DGS parameters of a compressed PLY file."""
    path = Path(path)
    try:
        ply = PlyData.read(str(path))
    except (PlyParseError, ValueError, EOFError) as error:
        raise GaussianFileError(f"{path}: not a readable PLY file: {error}") from error
    if not is_compressed_ply(ply):
        raise GaussianFileError(f"{path}: not a compressed PLY (no chunk element and packed_position property)")
    return decode_compressed_ply(ply, path)

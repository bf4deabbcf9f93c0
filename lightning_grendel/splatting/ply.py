"""3DGS PLY export and import in the standard layout read by Inria's code, gsplat and common viewers.

Binary little-endian, one ``vertex`` element, every property float32, in the order
``x y z nx ny nz f_dc_0..2 f_rest_0..(3*(K-1)-1) opacity scale_0..2 rot_0..3`` with K = (degree+1)^2
(62 floats for SH degree 3). Values are raw, pre-activation: opacity logits, log scales, unnormalised
wxyz quaternions, SH coefficients. ``f_rest`` is channel-major (all red coefficients, then green, then
blue), which is ``shN.transpose(1, 2).flatten(1)`` for ``shN`` of shape [N, K-1, 3].
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from plyfile import PlyData, PlyElement, PlyParseError
from torch import Tensor

from lightning_grendel._atomic import atomic_write
from lightning_grendel.splatting.formats.common import (
    MAX_SH_DEGREE,
    PARAM_KEYS,
    GaussianFileError,
    check_params,
    non_finite_summary,
)
from lightning_grendel.splatting.formats.compressed_ply import decode_compressed_ply, is_compressed_ply

__all__ = ["PARAM_KEYS", "GaussianFileError", "load_ply", "non_finite_summary", "save_ply"]


def _property_names(num_rest: int) -> list[str]:
    return (
        ["x", "y", "z", "nx", "ny", "nz"]
        + [f"f_dc_{i}" for i in range(3)]
        + [f"f_rest_{i}" for i in range(num_rest)]
        + ["opacity"]
        + [f"scale_{i}" for i in range(3)]
        + [f"rot_{i}" for i in range(4)]
    )


def _as_numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).numpy()


def save_ply(path: str | os.PathLike, params: dict[str, Tensor]) -> None:
    """Write Gaussians to ``path`` atomically (a half-written file never replaces a good one)."""
    n = check_params(params, "save_ply")
    problem = non_finite_summary(params)
    if problem:
        raise GaussianFileError(f"save_ply: {path}: {problem}; refusing to write a diverged model")
    sh_rest = params["shN"].transpose(1, 2).reshape(n, -1)
    columns = [
        _as_numpy(params["means"]),
        np.zeros((n, 3), dtype=np.float32),
        _as_numpy(params["sh0"].reshape(n, 3)),
        _as_numpy(sh_rest),
        _as_numpy(params["opacities"].reshape(n, 1)),
        _as_numpy(params["scales"]),
        _as_numpy(params["quats"]),
    ]
    names = _property_names(sh_rest.shape[1])
    vertices = np.empty(n, dtype=[(name, "<f4") for name in names])
    flat = np.concatenate(columns, axis=1)
    for i, name in enumerate(names):
        vertices[name] = flat[:, i]
    ply = PlyData([PlyElement.describe(vertices, "vertex")], text=False, byte_order="<")

    with atomic_write(path) as handle:
        ply.write(handle)


def load_ply(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a 3DGS PLY into raw parameters; the SH degree is inferred from the ``f_rest_*`` count.

    Normals are optional (gsplat's exporter omits them); every other standard property is required.
    Properties beyond the standard ones (some exporters add e.g. colour bytes) are ignored. A compressed
    PLY (PlayCanvas / SuperSplat, :mod:`~.formats.compressed_ply`) is recognised and decoded.
    """
    path = Path(path)
    try:
        ply = PlyData.read(str(path))
    except (PlyParseError, ValueError, EOFError) as error:
        raise GaussianFileError(f"{path}: not a readable PLY file: {error}") from error
    except OSError as error:
        raise GaussianFileError(f"{path}: cannot read: {error.strerror or error}") from error
    if "vertex" not in [element.name for element in ply.elements]:
        raise GaussianFileError(f"{path}: no 'vertex' element in the PLY header")
    if is_compressed_ply(ply):
        return decode_compressed_ply(ply, path)
    vertex = ply["vertex"]
    present = {prop.name for prop in vertex.properties}
    num_rest = sum(1 for name in present if name.startswith("f_rest_"))
    required = [name for name in _property_names(num_rest) if name not in ("nx", "ny", "nz")]
    missing = [name for name in required if name not in present]
    if missing:
        raise GaussianFileError(f"{path}: not a 3DGS PLY: missing vertex properties {', '.join(missing)}")
    coefficients = num_rest // 3 + 1
    if num_rest % 3 or coefficients not in {(d + 1) ** 2 for d in range(MAX_SH_DEGREE + 1)}:
        raise GaussianFileError(
            f"{path}: {num_rest} f_rest properties do not match an SH degree 0..3 (expected 0, 9, 24 or 45)"
        )

    def stack(names: list[str]) -> Tensor:
        return torch.from_numpy(np.stack([np.asarray(vertex[name], dtype=np.float32) for name in names], 1))

    n = vertex.count
    sh_rest = stack([f"f_rest_{i}" for i in range(num_rest)]) if num_rest else torch.zeros(n, 0)
    params = {
        "means": stack(["x", "y", "z"]),
        "scales": stack([f"scale_{i}" for i in range(3)]),
        "quats": stack([f"rot_{i}" for i in range(4)]),
        "opacities": stack(["opacity"])[:, 0].contiguous(),
        "sh0": stack([f"f_dc_{i}" for i in range(3)]).reshape(n, 1, 3),
        "shN": sh_rest.reshape(n, 3, coefficients - 1).transpose(1, 2).contiguous(),
    }
    problem = non_finite_summary(params)
    if problem:
        raise GaussianFileError(f"{path}: {problem}")
    return params

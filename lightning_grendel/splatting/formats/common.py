"""What every Gaussian file format shares: the error type, the parameter checks and the quantisation helpers.

Every reader returns, and every writer takes, the raw 3DGS parameters of :mod:`~..gaussians` as float32
CPU tensors: ``means`` [N, 3], ``scales`` [N, 3] (log), ``quats`` [N, 4] (wxyz, any norm), ``opacities``
[N] (logits), ``sh0`` [N, 1, 3] and ``shN`` [N, K-1, 3] with K = (degree + 1)^2, degree 0..3.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

PARAM_KEYS = ("means", "scales", "quats", "opacities", "sh0", "shN")
MAX_SH_DEGREE = 3
ALPHA_FLOOR = 0.5 / 255.0  # an 8-bit alpha of 0 or 255 decodes half a step inside (0, 1): a finite logit


class GaussianFileError(ValueError):
    """A Gaussian scene file is unreadable, of another layout, or cannot be written; the message names it."""


def sh_degree_of_rest(count: int) -> int | None:
    """The SH degree whose non-DC coefficient count (per channel) is ``count``; None when there is none."""
    for degree in range(MAX_SH_DEGREE + 1):
        if (degree + 1) ** 2 - 1 == count:
            return degree
    return None


def check_params(params: dict[str, Tensor], who: str) -> int:
    """Keys and shapes of raw Gaussian parameters; returns N. ``who`` starts the error message."""
    if set(params) != set(PARAM_KEYS):
        raise ValueError(f"{who}: params must have exactly the keys {PARAM_KEYS}, got {sorted(params)}")
    n = params["means"].shape[0]
    expected = {"means": (n, 3), "scales": (n, 3), "quats": (n, 4), "opacities": (n,), "sh0": (n, 1, 3)}
    for key, shape in expected.items():
        if tuple(params[key].shape) != shape:
            raise ValueError(f"{who}: {key} must have shape {shape}, got {tuple(params[key].shape)}")
    sh_n = params["shN"]
    if sh_n.dim() != 3 or sh_n.shape[0] != n or sh_n.shape[2] != 3:
        raise ValueError(f"{who}: shN must have shape [N, K-1, 3], got {tuple(sh_n.shape)}")
    if sh_degree_of_rest(sh_n.shape[1]) is None:
        raise ValueError(f"{who}: shN holds {sh_n.shape[1]} coefficients, not (d+1)^2-1 for d in 0..3")
    return n


def non_finite_summary(params: dict[str, Tensor]) -> str:
    """Empty when every Gaussian is finite, else how many rows are not, in total and per parameter."""
    n = params["means"].shape[0]
    rows = {key: ~torch.isfinite(value.detach()).reshape(n, -1).all(dim=1) for key, value in params.items()}
    bad = torch.stack(list(rows.values())).any(dim=0) if rows else torch.zeros(n, dtype=torch.bool)
    if not bad.any():
        return ""
    parts = ", ".join(f"{key}: {int(mask.sum())}" for key, mask in rows.items() if mask.any())
    return f"{int(bad.sum())} of {n} Gaussians have NaN or infinite values ({parts})"


def checked_for_writing(path: str | os.PathLike, params: dict[str, Tensor], who: str) -> dict[str, np.ndarray]:
    """Validated float32 NumPy copies of ``params``; a diverged (non-finite) model is refused, naming ``path``."""
    check_params(params, who)
    problem = non_finite_summary(params)
    if problem:
        raise GaussianFileError(f"{who}: {path}: {problem}; refusing to write a diverged model")
    return {key: value.detach().to("cpu", torch.float32).numpy() for key, value in params.items()}


def as_params(arrays: dict[str, np.ndarray], path: str | os.PathLike) -> dict[str, Tensor]:
    """float32 tensors in the canonical layout from decoded arrays; non-finite values are an error naming ``path``."""
    params = {key: torch.from_numpy(np.ascontiguousarray(arrays[key], dtype=np.float32)) for key in PARAM_KEYS}
    check_params(params, str(path))
    problem = non_finite_summary(params)
    if problem:
        raise GaussianFileError(f"{path}: {problem}")
    return params


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def logit_of_unorm8(values: np.ndarray) -> np.ndarray:
    """Opacity logits of 8-bit alphas ``values / 255``, kept off 0 and 1 (see ``ALPHA_FLOOR``)."""
    alpha = np.clip(values.astype(np.float64) / 255.0, ALPHA_FLOOR, 1.0 - ALPHA_FLOOR)
    return np.log(alpha / (1.0 - alpha))


def unorm(value: np.ndarray, bits: int) -> np.ndarray:
    """``value`` in [0, 1] to an unsigned ``bits``-bit integer, rounded and clamped."""
    top = (1 << bits) - 1
    return np.clip(np.floor(value * top + 0.5), 0, top).astype(np.uint32)


def normalised_quats(quats: np.ndarray) -> np.ndarray:
    """Unit quaternions; a zero-length row (which renders as nothing sensible) becomes the identity."""
    norm = np.linalg.norm(quats, axis=1, keepdims=True)
    identity = np.zeros_like(quats)
    identity[:, 0] = 1.0
    return np.where(norm > 0, quats / np.maximum(norm, 1e-30), identity)


def pack_smallest_three(quats: np.ndarray, magnitude_bits: int, signed: bool) -> np.ndarray:
    """Unit quaternions [N, 4] -> uint32: the largest component's index in the top 2 bits, then the other
    three in order, each ``magnitude_bits`` (+1 sign bit when ``signed``) wide, the largest made positive.

    Signed (SPZ v3+): sign bit then |q| / sqrt(1/2) as an unsigned integer. Unsigned (compressed PLY):
    q / sqrt(2) + 0.5 as an unsigned integer.
    """
    largest = np.argmax(np.abs(quats), axis=1)
    sign = np.where(quats[np.arange(len(quats)), largest] < 0, -1.0, 1.0)
    q = quats * sign[:, None]
    packed = largest.astype(np.uint32)
    width = magnitude_bits + (1 if signed else 0)
    for i in range(4):
        keep = largest != i
        if signed:
            negative = (q[:, i] < 0).astype(np.uint32) << np.uint32(magnitude_bits)
            value = unorm(np.abs(q[:, i]) / math.sqrt(0.5), magnitude_bits) | negative
        else:
            value = unorm(q[:, i] * math.sqrt(0.5) + 0.5, magnitude_bits)
        packed = np.where(keep, (packed << np.uint32(width)) | value, packed)
    return packed


def unpack_smallest_three(packed: np.ndarray, magnitude_bits: int, signed: bool) -> np.ndarray:
    """Inverse of :func:`pack_smallest_three`: unit quaternions [N, 4] in the stored component order."""
    packed = packed.astype(np.uint32)
    largest = (packed >> np.uint32(30)).astype(np.int64)
    width = magnitude_bits + (1 if signed else 0)
    mask = np.uint32((1 << magnitude_bits) - 1)
    top = float((1 << magnitude_bits) - 1)
    quats = np.zeros((len(packed), 4), np.float64)
    rest = packed.copy()
    for i in range(3, -1, -1):
        keep = largest != i
        magnitude = (rest & mask).astype(np.float64) / top
        if signed:
            negative = ((rest >> np.uint32(magnitude_bits)) & np.uint32(1)).astype(bool)
            value = np.where(negative, -1.0, 1.0) * magnitude * math.sqrt(0.5)
        else:
            value = (magnitude - 0.5) * math.sqrt(2.0)
        quats[:, i] = np.where(keep, value, 0.0)
        rest = np.where(keep, rest >> np.uint32(width), rest)
    quats[np.arange(len(packed)), largest] = np.sqrt(np.maximum(0.0, 1.0 - (quats**2).sum(axis=1)))
    return quats


def warn_clamped(format: str, name: str, values: np.ndarray, low: float, high: float) -> None:
    """One warning with the count of ``values`` outside the format's range [low, high], which it clamps."""
    count = int(((values < low) | (values > high)).sum())
    if count:
        log.warning("%s: %d %s values outside the format's range [%g, %g] are clamped", format, count, name, low, high)

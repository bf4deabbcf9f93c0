"""The Gaussians of a trained scene, from wherever they are: a checkpoint file, a Grendel sharded
checkpoint directory, or a Gaussian file (standard or compressed PLY, SPZ, ``.splat``).

Checkpoints are read with ``weights_only=True`` and only their ``gaussians.*`` tensors are taken (no
module is built, so any hyperparameters load); a Grendel directory's shards are merged into one set,
checked against its manifest. Commands that show or convert a scene (``export``, and the viewer) share it.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_grendel.splatting.formats.common import PARAM_KEYS, GaussianFileError, as_params
from lightning_grendel.splatting.formats.io import read_gaussians
from lightning_grendel.splatting.grendel.checkpoint import GAUSSIAN_PREFIX, META_FILE, load_sharded

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


class SceneSourceError(ValueError):
    """A scene source that is missing, unreadable or not a Gaussian scene; the message names it."""


@dataclass
class SceneSource:
    """Raw Gaussian parameters (float32, CPU) and what the source says about them."""

    params: dict[str, Tensor]
    kind: str  # "checkpoint", "grendel" or "file"
    antialiased: bool = False  # trained with rasterize_mode "antialiased" (checkpoints only)
    data: dict[str, Any] = field(default_factory=dict)  # the checkpoint's data module settings (its cameras)


def _gaussians_of(checkpoint: Any, path: Path) -> SceneSource:
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    missing = [key for key in PARAM_KEYS if not isinstance(state, dict) or f"{GAUSSIAN_PREFIX}{key}" not in state]
    if missing:
        raise SceneSourceError(f"{path}: not a GaussianSplattingModule checkpoint (no {GAUSSIAN_PREFIX}{missing[0]} "
                               "in its state_dict)")
    raw = {key: state[f"{GAUSSIAN_PREFIX}{key}"].detach().to("cpu", torch.float32).numpy() for key in PARAM_KEYS}
    try:
        params = as_params(raw, path)
    except ValueError as error:
        raise SceneSourceError(f"{path}: {error}") from error
    hparams = checkpoint.get("hyper_parameters") or {}
    data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    return SceneSource(params, "checkpoint", hparams.get("rasterize_mode") == "antialiased", data)


def load_scene(path: str | Path) -> SceneSource:
    """The Gaussians of a checkpoint file, a Grendel checkpoint directory or a Gaussian file."""
    path = Path(path)
    if path.is_dir():
        if not (path / META_FILE).is_file():
            raise SceneSourceError(f"{path}: a directory but not a GrendelStrategy checkpoint (no {META_FILE})")
        try:
            checkpoint = load_sharded(path, 0, 1)
        except (OSError, RuntimeError, ValueError, KeyError) as error:
            raise SceneSourceError(f"{path}: {error}") from error
        source = _gaussians_of(checkpoint, path)
        source.kind = "grendel"
        return source
    if not path.is_file():
        raise SceneSourceError(f"{path}: no such file or directory")
    if zipfile.is_zipfile(path):  # torch.save writes zip archives
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file gets its name in the message
            raise SceneSourceError(f"{path}: cannot read this checkpoint (weights_only load): {error}") from error
        return _gaussians_of(checkpoint, path)
    if path.suffix in CHECKPOINT_SUFFIXES:
        raise SceneSourceError(f"{path}: truncated or not a checkpoint file (no zip directory at its end)")
    try:
        return SceneSource(read_gaussians(path), "file")
    except GaussianFileError as error:
        raise SceneSourceError(str(error)) from error

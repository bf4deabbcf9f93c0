"""Sharded checkpoints: a directory with one file per rank plus ``meta.pt``, resumable on any world size.

Each rank writes its own Gaussians and Adam state (``shard_{rank}.pt``); rank 0 writes everything the
ranks share (loops, callbacks, hyperparameters) plus the world size to ``meta.pt``. Loading on another
world size concatenates every shard's Gaussian rows (parameters and moments) and hands each rank its
even share, so no Gaussian is lost. Files are written atomically and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from lightning_grendel.splatting.gaussians import PARAM_KEYS
from lightning_grendel.splatting.grendel.redistribute import even_shares
from lightning_grendel.splatting.param_surgery import MOMENT_KEYS

META_FILE = "meta.pt"
PER_RANK_KEYS = ("state_dict", "optimizer_states")
GAUSSIAN_PREFIX = "gaussians."


def shard_file(rank: int) -> str:
    return f"shard_{rank}.pt"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(obj, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_sharded(checkpoint: dict[str, Any], directory: Path, rank: int, world_size: int) -> None:
    """Write this rank's shard (and, on rank 0, the shared metadata) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    shard = {key: checkpoint[key] for key in PER_RANK_KEYS if key in checkpoint}
    atomic_torch_save(shard, directory / shard_file(rank))
    if rank == 0:
        meta = {key: value for key, value in checkpoint.items() if key not in PER_RANK_KEYS}
        meta["grendel"] = {**meta.get("grendel", {}), "world_size": world_size}
        atomic_torch_save(meta, directory / META_FILE)


def _load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - a corrupt file gets its name in the message
        raise RuntimeError(f"{path}: cannot read this checkpoint file: {error}") from error


def load_sharded(directory: Path, rank: int, world_size: int) -> dict[str, Any]:
    """The checkpoint as rank ``rank`` of ``world_size`` sees it, re-partitioned when the world size changed."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory}: not a GrendelStrategy checkpoint directory (no {META_FILE})")
    meta = _load(meta_path)
    saved_world = int(meta["grendel"]["world_size"])
    missing = [shard_file(r) for r in range(saved_world) if not (directory / shard_file(r)).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: checkpoint of world size {saved_world} is missing {missing}")
    if saved_world == world_size:
        return {**meta, **_load(directory / shard_file(rank))}
    shards = [_load(directory / shard_file(r)) for r in range(saved_world)]
    return {**meta, **reshard(shards, rank, world_size)}


def _rows_of_rank(total: int, rank: int, world_size: int) -> slice:
    shares = even_shares(total, world_size)
    start = sum(shares[:rank])
    return slice(start, start + shares[rank])


def reshard(shards: list[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any]:
    """Concatenate the shards' Gaussian rows and keep rank ``rank``'s even share of ``world_size``."""
    first = shards[0]
    total = sum(shard["state_dict"][f"{GAUSSIAN_PREFIX}means"].shape[0] for shard in shards)
    rows = _rows_of_rank(total, rank, world_size)
    state_dict = dict(first["state_dict"])
    for key in PARAM_KEYS:
        name = f"{GAUSSIAN_PREFIX}{key}"
        state_dict[name] = torch.cat([shard["state_dict"][name] for shard in shards])[rows].clone()
    result: dict[str, Any] = {"state_dict": state_dict}
    if "optimizer_states" in first:
        result["optimizer_states"] = [
            _reshard_optimizer([shard["optimizer_states"][i] for shard in shards], rows)
            for i in range(len(first["optimizer_states"]))
        ]
    return result


def _reshard_optimizer(states: list[dict[str, Any]], rows: slice) -> dict[str, Any]:
    first = states[0]
    merged_state = {index: dict(value) for index, value in first["state"].items()}
    for group in first["param_groups"]:
        if group.get("name") not in PARAM_KEYS:
            continue
        for index in group["params"]:
            if all(index in state["state"] for state in states):
                for moment in MOMENT_KEYS:
                    stacked = torch.cat([state["state"][index][moment] for state in states])
                    merged_state[index][moment] = stacked[rows].clone()
            else:
                merged_state.pop(index, None)
    return {"state": merged_state, "param_groups": first["param_groups"]}

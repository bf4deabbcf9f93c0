"""Sharded checkpoints: a directory with one file per rank plus ``meta.pt``, resumable on any world size.

Each rank writes its own Gaussians and Adam state (``shard_{rank}.pt``); rank 0 writes everything the
ranks share (loops, callbacks, hyperparameters) plus the world size to ``meta.pt``. Loading on another
world size concatenates every shard's Gaussian rows (parameters and moments) and hands each rank its
even share, so no Gaussian is lost. Files are loaded with ``weights_only=True``.

A save is all or nothing: every rank writes into a staging directory beside the target, the ranks
exchange their files' SHA-256 digests (a collective, so a dead rank fails the save, it cannot tear it),
and rank 0 writes ``manifest.json`` (save id, world size, digest of every file) and swaps the staging
directory into place: in one atomic exchange on Linux (``renameat2(RENAME_EXCHANGE)``), elsewhere with
two renames (a crash between them leaves the previous checkpoint in ``.NAME.old-ID``, which the load
error points at). The previous checkpoint stays whole until the swap. On load every
file read is checked against the manifest, so a shard from another save, a flipped byte or a missing
file is refused naming the file (torch's zip reader checks no CRC). Staging directories of killed saves
are removed by the next successful save of the same name and are never read.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins import TorchCheckpointIO

from lightning_grendel._atomic import atomic_write
from lightning_grendel.splatting.gaussians import PARAM_KEYS
from lightning_grendel.splatting.grendel.redistribute import even_shares
from lightning_grendel.splatting.param_surgery import MOMENT_KEYS

META_FILE = "meta.pt"
MANIFEST_FILE = "manifest.json"
PER_RANK_KEYS = ("state_dict", "optimizer_states")
GAUSSIAN_PREFIX = "gaussians."


class CheckpointIntegrityError(RuntimeError):
    """A sharded checkpoint is torn, incomplete or corrupt."""


def shard_file(rank: int) -> str:
    return f"shard_{rank}.pt"


def staging_dir(directory: Path, save_id: str) -> Path:
    """Where a save is assembled before it replaces ``directory`` (a hidden sibling)."""
    return directory.parent / f".{directory.name}.saving-{save_id}"


class _HashingWriter:
    """A binary file that hashes what is written to it (torch.save streams its zip archive through it)."""

    def __init__(self, file: Any) -> None:
        self.file, self.sha = file, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def atomic_torch_save(obj: Any, path: Path) -> str:
    """``torch.save`` through :func:`~lightning_grendel._atomic.atomic_write`; returns the file's SHA-256."""
    with atomic_write(path) as file:
        writer = _HashingWriter(file)
        torch.save(obj, writer)
    return writer.sha.hexdigest()


def write_shard(checkpoint: dict[str, Any], directory: Path, rank: int, save_id: str) -> str:
    """This rank's part of save ``save_id``, into the staging directory; returns its digest."""
    staging = staging_dir(Path(directory), save_id)
    staging.mkdir(parents=True, exist_ok=True)
    shard = {key: checkpoint[key] for key in PER_RANK_KEYS if key in checkpoint}
    return atomic_torch_save(shard, staging / shard_file(rank))


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def exchange_directories(first: Path, second: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2``); False where that is unsupported."""
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if function(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel or a filesystem without it
        return False
    raise OSError(code, os.strerror(code), f"{first} <-> {second}")


def commit_sharded(checkpoint: dict[str, Any], directory: Path, save_id: str, digests: list[str]) -> None:
    """Rank 0, once every shard is staged: write meta and manifest, then swap the directory into place."""
    directory = Path(directory)
    staging = staging_dir(directory, save_id)
    meta = {key: value for key, value in checkpoint.items() if key not in PER_RANK_KEYS}
    meta["grendel"] = {**meta.get("grendel", {}), "world_size": len(digests), "save_id": save_id}
    files = {shard_file(rank): digest for rank, digest in enumerate(digests)}
    files[META_FILE] = atomic_torch_save(meta, staging / META_FILE)
    manifest = {"save_id": save_id, "world_size": len(digests), "files": files}
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    _fsync_directory(staging)
    if directory.exists() and exchange_directories(staging, directory):
        shutil.rmtree(staging, ignore_errors=True)  # it now holds the previous checkpoint
    elif directory.exists():
        old = directory.parent / f".{directory.name}.old-{save_id}"
        os.rename(directory, old)
        os.rename(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, directory)
    _fsync_directory(directory.parent)
    for stale in directory.parent.glob(f".{directory.name}.saving-*"):  # left by killed saves
        shutil.rmtree(stale, ignore_errors=True)


def save_sharded(checkpoint: dict[str, Any], directory: Path, rank: int, world_size: int) -> None:
    """Every rank calls this: stage the shards, exchange digests (a collective), rank 0 commits."""
    distributed = world_size > 1
    holder = [uuid.uuid4().hex]
    if distributed:
        dist.broadcast_object_list(holder, src=0)
    save_id = holder[0]
    digest = write_shard(checkpoint, directory, rank, save_id)
    digests: list[Any] = [digest]
    if distributed:
        digests = [None] * world_size
        dist.all_gather_object(digests, digest)
    if rank == 0:
        commit_sharded(checkpoint, directory, save_id, digests)
    if distributed:
        dist.barrier()


def load_file(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - a corrupt file gets its name in the message
        raise CheckpointIntegrityError(f"{path}: cannot read this checkpoint file: {error}") from error


class CheckedCheckpointIO(TorchCheckpointIO):
    """Torch checkpoints for one-process strategies, whose errors name the file and what to do.

    Without it a Grendel checkpoint directory given to ``test`` is a bare ``IsADirectoryError`` and a
    truncated ``.ckpt`` is torch's zip message without the path.
    """

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        local = Path(path)
        if local.is_dir():
            kind = ("a GrendelStrategy sharded checkpoint directory" if (local / META_FILE).is_file()
                    else "a directory, not a checkpoint file")
            raise IsADirectoryError(
                f"{local}: {kind}; load it with the strategy that wrote it, e.g. --trainer.strategy=grendel "
                "(any number of devices, --trainer.devices=1 included): Grendel checkpoints reshard on load"
            )
        if local.is_file() and not zipfile.is_zipfile(local):
            raise CheckpointIntegrityError(f"{local}: truncated or not a checkpoint file (no zip directory at its end)")
        options: dict[str, Any] = {"weights_only": True if weights_only is None else weights_only}
        if map_location is not None:
            options["map_location"] = map_location
        try:
            return super().load_checkpoint(path, **options)
        except (RuntimeError, EOFError, ValueError, OSError) as error:
            if isinstance(error, FileNotFoundError):
                raise
            raise CheckpointIntegrityError(f"{path}: cannot read this checkpoint file: {error}") from error


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a committed save; a missing or unreadable one is a torn or foreign directory."""
    directory = Path(directory)
    if not directory.is_dir():
        interrupted = sorted(directory.parent.glob(f".{directory.name}.old-*"))
        hint = (f"; a save was interrupted while swapping directories: the previous checkpoint is in "
                f"{interrupted[0]} (rename it back to {directory.name})") if interrupted else ""
        raise FileNotFoundError(f"{directory}: no such GrendelStrategy checkpoint directory{hint}")
    path = directory / MANIFEST_FILE
    if not path.is_file():
        what = "no meta.pt" if not (directory / META_FILE).is_file() else f"no {MANIFEST_FILE}"
        raise FileNotFoundError(f"{directory}: not a complete GrendelStrategy checkpoint directory ({what}; "
                                "a save that did not finish, or not a sharded checkpoint)")
    try:
        manifest = json.loads(path.read_text())
        files, world_size = dict(manifest["files"]), int(manifest["world_size"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointIntegrityError(f"{path}: corrupt manifest ({type(error).__name__}: {error})") from error
    missing = [name for name in [META_FILE, *map(shard_file, range(world_size))] if name not in files]
    if missing:
        raise CheckpointIntegrityError(f"{path}: corrupt manifest: no digest for {missing}")
    return manifest


def _verified_load(directory: Path, name: str, manifest: dict[str, Any]) -> dict[str, Any]:
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: checkpoint of world size {manifest['world_size']} is missing {name}")
    if file_digest(path) != manifest["files"][name]:
        raise CheckpointIntegrityError(
            f"{path}: torn or corrupt checkpoint: its SHA-256 differs from the one {directory / MANIFEST_FILE} "
            f"recorded for save {manifest['save_id']} (a file from another save, or damaged); resume from an "
            "earlier checkpoint"
        )
    return load_file(path)


def load_sharded(directory: Path, rank: int, world_size: int) -> dict[str, Any]:
    """The checkpoint as rank ``rank`` of ``world_size`` sees it, re-partitioned when the world size changed."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    saved_world = int(manifest["world_size"])
    missing = [shard_file(r) for r in range(saved_world) if not (directory / shard_file(r)).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: checkpoint of world size {saved_world} is missing {missing}")
    meta = _verified_load(directory, META_FILE, manifest)
    if saved_world == world_size:
        return {**meta, **_verified_load(directory, shard_file(rank), manifest)}
    shards = [_verified_load(directory, shard_file(r), manifest) for r in range(saved_world)]
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

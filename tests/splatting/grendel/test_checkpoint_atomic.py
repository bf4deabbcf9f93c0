"""Sharded checkpoints are all or nothing: a rank killed mid-save leaves the previous checkpoint whole and
resumable with every Gaussian; torn, corrupt or foreign directories and truncated files are refused
naming the file, on every rank."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.grendel import checkpoint as ckpt
from lightning_grendel.splatting.grendel.checkpoint import (
    MANIFEST_FILE,
    CheckedCheckpointIO,
    CheckpointIntegrityError,
    commit_sharded,
    load_sharded,
    save_sharded,
    shard_file,
    write_shard,
)
from lightning_grendel.splatting.module import GaussianSplattingModule
from tests.helpers.distributed import run_distributed

TIMEOUT_S = 5


def shard_rows(rank: int, save: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s Gaussians in save ``save``: 3 + 2·rank rows, values that say which save and rank."""
    count = 3 + 2 * rank
    g = torch.Generator().manual_seed(100 * save + rank)
    shapes = {"means": (3,), "scales": (3,), "quats": (4,), "opacities": (), "sh0": (1, 3), "shN": (3, 3)}
    return {key: torch.randn(count, *shape, generator=g) for key, shape in shapes.items()}


def as_checkpoint(rows: dict[str, torch.Tensor], step: int) -> dict:
    return {"state_dict": {f"gaussians.{k}": v for k, v in rows.items()}, "global_step": step}


def stage_save(directory: Path, world: int, save: int) -> None:
    """What ``save_sharded`` does on ``world`` ranks, done by one process."""
    digests = [write_shard(as_checkpoint(shard_rows(r, save), save), directory, r, f"save{save}") for r in range(world)]
    commit_sharded(as_checkpoint(shard_rows(0, save), save), directory, f"save{save}", digests)


def _saving_rank(rank: int, init_file: str, directory: str, marker: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    save_sharded(as_checkpoint(shard_rows(rank, 1), 1), Path(directory), rank, 2)
    if rank == 1:  # the stall hook: start writing save 2's shard, then hang until killed
        def stalled_save(obj, path):
            Path(f"{path}.partial.tmp").write_bytes(b"half a shard")
            Path(marker).touch()
            time.sleep(120)

        ckpt.atomic_torch_save = stalled_save
    try:
        save_sharded(as_checkpoint(shard_rows(rank, 2), 2), Path(directory), rank, 2)
    except Exception as error:  # noqa: BLE001 - rank 0 reports how the save failed
        Path(marker + ".rank0").write_text(f"{type(error).__name__}: {error}")
        os._exit(1)
    os._exit(0)


def rows_of(loaded: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([c["state_dict"][f"gaussians.{key}"] for c in loaded]) for key in shard_rows(0, 0)}


@pytest.mark.timeout(120)
def test_a_rank_killed_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path):
    directory, marker = tmp_path / "last.ckpt", str(tmp_path / "stalled")
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as rendezvous:
        init_file = os.path.join(rendezvous, "init")
        processes = [context.Process(target=_saving_rank, args=(r, init_file, str(directory), marker))
                     for r in range(2)]
        for process in processes:
            process.start()
        deadline = time.monotonic() + 90
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert os.path.exists(marker), "rank 1 never reached the second save"
        os.kill(processes[1].pid, signal.SIGKILL)
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    assert processes[0].exitcode == 1, "rank 0 must fail the save, not finish it or hang"
    assert "Error" in Path(marker + ".rank0").read_text()
    assert list(tmp_path.glob(".last.ckpt.saving-*")), "the killed save's staging directory is left beside it"
    expected = {key: torch.cat([shard_rows(r, 1)[key] for r in range(2)]) for key in shard_rows(0, 0)}
    for world in (2, 1, 3):  # the previous save, with every Gaussian, on any world size
        got = rows_of([load_sharded(directory, r, world) for r in range(world)])
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    assert load_sharded(directory, 0, 2)["global_step"] == 1
    save_sharded(as_checkpoint(shard_rows(0, 3), 3), directory, 0, 1)  # the next good save cleans up
    assert not list(tmp_path.glob(".last.ckpt.*")) and load_sharded(directory, 0, 1)["global_step"] == 3


def test_a_torn_directory_is_refused_naming_the_file(tmp_path):
    stage_save(tmp_path / "a", 2, save=1)
    stage_save(tmp_path / "b", 2, save=2)
    shutil.copy(tmp_path / "a" / shard_file(1), tmp_path / "b" / shard_file(1))  # step 1 mixed into step 2
    load_sharded(tmp_path / "b", 0, 2)  # rank 0 reads only its own shard and meta ...
    for rank, world in ((1, 2), (0, 1), (0, 3)):  # ... every rank that reads shard_1 refuses
        with pytest.raises(CheckpointIntegrityError, match=r"b/shard_1\.pt: torn or corrupt checkpoint"):
            load_sharded(tmp_path / "b", rank, world)


@pytest.mark.parametrize("name", ["meta.pt", "shard_0.pt", MANIFEST_FILE])
def test_a_flipped_byte_is_refused(tmp_path, name):
    stage_save(tmp_path / "c", 1, save=1)
    path = tmp_path / "c" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match="corrupt"):
        load_sharded(tmp_path / "c", 0, 1)


def test_an_unfinished_save_is_not_a_checkpoint(tmp_path):
    directory = tmp_path / "d"
    write_shard(as_checkpoint(shard_rows(0, 1), 1), directory, 0, "x")  # staged, never committed
    staging = tmp_path / ".d.saving-x"
    with pytest.raises(FileNotFoundError, match="not a complete GrendelStrategy checkpoint"):
        load_sharded(staging, 0, 1)
    with pytest.raises(FileNotFoundError, match="no such GrendelStrategy checkpoint directory"):
        load_sharded(directory, 0, 1)
    stage_save(directory, 1, save=1)
    os.rename(directory, tmp_path / ".d.old-y")  # killed between the two renames of a later save
    with pytest.raises(FileNotFoundError, match=r"previous checkpoint is in .*\.d\.old-y"):
        load_sharded(directory, 0, 1)


def _strategy_load(rank: int, world: int, directory: str) -> str:
    from lightning.fabric.plugins.environments import LightningEnvironment

    from lightning_grendel.splatting.grendel import GrendelStrategy

    environment = LightningEnvironment()
    environment.set_global_rank(rank)
    environment.set_world_size(world)
    strategy = GrendelStrategy(parallel_devices=[torch.device("cpu")] * world, cluster_environment=environment)
    try:
        strategy.load_checkpoint(directory)
    except CheckpointIntegrityError as error:
        return str(error)
    return "loaded"


@pytest.mark.timeout(120)
def test_the_strategy_refuses_a_torn_checkpoint_on_every_rank(tmp_path):
    stage_save(tmp_path / "a", 2, save=1)
    stage_save(tmp_path / "b", 2, save=2)
    shutil.copy(tmp_path / "a" / shard_file(1), tmp_path / "b" / shard_file(1))
    messages = run_distributed(_strategy_load, 2, str(tmp_path / "b"), timeout_s=30)
    assert all("(rank 1)" in m and "shard_1.pt: torn or corrupt" in m for m in messages), messages


def _tiny_fit(tmp_path: Path) -> Path:
    module = GaussianSplattingModule(sh_degree=0, export_ply=False, backend="torch")
    data = GaussianSplattingDataModule(format="demo", image_width=16, num_init_points=50)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, limit_val_batches=0,
            callbacks=[checkpoints], default_root_dir=tmp_path, enable_model_summary=False).fit(module, data)
    return tmp_path / "ckpt" / "last.ckpt"


def _test_run(tmp_path: Path, ckpt_path: Path) -> None:
    module = GaussianSplattingModule(sh_degree=0, export_ply=False, backend="torch")
    data = GaussianSplattingDataModule(format="demo", image_width=16, num_init_points=50)
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
            enable_model_summary=False).test(module, data, ckpt_path=str(ckpt_path), verbose=False)


@pytest.mark.timeout(60)
def test_one_process_test_names_the_file_and_hints_at_grendel(tmp_path):
    last = _tiny_fit(tmp_path)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(CheckpointIntegrityError, match=r"truncated\.ckpt: truncated or not a checkpoint"):
        _test_run(tmp_path, truncated)
    stage_save(tmp_path / "sharded", 2, save=1)
    with pytest.raises(IsADirectoryError, match=r"sharded: a GrendelStrategy sharded checkpoint directory; .*grendel"):
        _test_run(tmp_path, tmp_path / "sharded")
    assert json.loads((tmp_path / "sharded" / MANIFEST_FILE).read_text())["world_size"] == 2
    assert CheckedCheckpointIO().load_checkpoint(last)["global_step"] == 1  # a good file still loads

"""GrendelStrategy inside a real Trainer: registry names, fit on 2 ranks, sharded checkpoint, resume on 3."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_grendel  # noqa: F401  (registers the strategy names)
from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.grendel import GrendelStrategy
from lightning_grendel.splatting.grendel.checkpoint import META_FILE, shard_file
from lightning_grendel.splatting.module import GaussianSplattingModule
from tests.helpers.paths import REPO_ROOT


class _Record(Callback):
    """Writes what every rank holds into a file, since spawned ranks cannot return objects."""

    def __init__(self, folder: Path, stage: str) -> None:
        self.folder, self.stage = folder, stage

    def _dump(self, trainer, module) -> None:
        gathered = module.gathered_gaussians()  # collective: every rank joins
        local = {k: v.detach().clone() for k, v in module.gaussians.items()}
        torch.save({"local": local, "all": gathered, "views": module.images_seen,
                    "renderer": type(module.renderer).__name__, "batch": trainer.train_dataloader is not None},
                   self.folder / f"{self.stage}_rank{trainer.global_rank}.pt")

    def on_train_end(self, trainer, module) -> None:
        self._dump(trainer, module)

    def on_validation_end(self, trainer, module) -> None:
        if self.stage == "validate":
            self._dump(trainer, module)


def test_strategy_names_resolve():
    trainer = Trainer(strategy="grendel_spawn", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, GrendelStrategy)
    assert trainer.strategy.distributed_sampler_kwargs == {"num_replicas": 1, "rank": 0}


def _module() -> GaussianSplattingModule:
    from lightning_grendel.splatting.densify import DensifyConfig

    return GaussianSplattingModule(sh_degree=1, densify=DensifyConfig(start_images=2, every_images=4),
                                   export_ply=False, backend="torch")


def _data() -> GaussianSplattingDataModule:
    return GaussianSplattingDataModule(format="demo", image_width=32, batch_size=2, num_init_points=300)


@pytest.mark.timeout(600)
def test_fit_on_two_ranks_then_resume_on_three(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=3)
    fit = Trainer(
        strategy=GrendelStrategy(start_method="spawn", timeout_s=120), accelerator="cpu", devices=2, max_steps=3,
        limit_val_batches=0, logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
        callbacks=[checkpoints, _Record(tmp_path, "fit")],
    )
    fit.fit(_module(), _data())
    last = tmp_path / "ckpt" / "last.ckpt"
    assert (last / META_FILE).is_file() and (last / shard_file(0)).is_file() and (last / shard_file(1)).is_file()
    fit_ranks = [torch.load(tmp_path / f"fit_rank{r}.pt", weights_only=False) for r in range(2)]
    assert all(r["renderer"] == "GrendelRenderer" for r in fit_ranks)
    assert fit_ranks[0]["views"] == 6  # 3 steps x 2 views, on every rank
    total = sum(r["local"]["means"].shape[0] for r in fit_ranks)
    assert fit_ranks[0]["all"]["means"].shape[0] == total and fit_ranks[1]["all"] is None

    resume = Trainer(
        strategy=GrendelStrategy(start_method="spawn", timeout_s=120), accelerator="cpu", devices=3,
        limit_val_batches=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
        callbacks=[_Record(tmp_path, "validate")],
    )
    resume.validate(_module(), _data(), ckpt_path=str(last))
    resumed = [torch.load(tmp_path / f"validate_rank{r}.pt", weights_only=False) for r in range(3)]
    counts = [r["local"]["means"].shape[0] for r in resumed]
    assert sum(counts) == total and max(counts) - min(counts) <= 1
    for key, value in fit_ranks[0]["all"].items():
        torch.testing.assert_close(resumed[0]["all"][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.timeout(600)
def test_cli_launches_two_ranks_and_exports_every_gaussian(tmp_path):
    import subprocess
    import sys

    from plyfile import PlyData

    repo = REPO_ROOT
    command = [sys.executable, "-m", "lightning_grendel", "fit", "-c", str(repo / "recipes/smoke/grendel.yaml")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "smoke_grendel" / "version_0"
    (checkpoint,) = (run / "checkpoints").glob("*.ckpt")
    shards = [torch.load(checkpoint / shard_file(r), weights_only=True) for r in range(2)]
    total = sum(s["state_dict"]["gaussians.means"].shape[0] for s in shards)
    assert PlyData.read(str(run / "point_cloud.ply"))["vertex"].count == total

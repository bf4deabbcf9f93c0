"""MCMC densification under GrendelStrategy: a per-rank budget, relocation inside each shard, Adam rows reset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.grendel import GrendelStrategy
from lightning_grendel.splatting.mcmc import MCMCConfig
from lightning_grendel.splatting.module import GaussianSplattingModule

CAP = 341  # odd: rank 0 holds 171, rank 1 holds 170


class _Watch(Callback):
    """Checks every relocation on its rank (rewritten rows have zero Adam moments) and dumps the shard."""

    def __init__(self, folder: Path, tag: str) -> None:
        self.folder, self.tag = folder, tag
        self.checked_rows = 0
        self.relocations = 0

    def on_train_start(self, trainer, module) -> None:
        densifier, relocate = module.densifier, module.densifier.relocate

        def checked_relocate(params, optimizer, generator):
            before = {k: v.detach().clone() for k, v in params.items()}
            moved = relocate(params, optimizer, generator)
            changed = (params["means"].detach() != before["means"]).any(1) | (
                params["opacities"].detach() != before["opacities"]
            )
            for param in params.values():
                for name in ("exp_avg", "exp_avg_sq"):
                    assert (optimizer.state[param][name][changed] == 0).all(), "relocated rows keep Adam moments"
            self.checked_rows += int(changed.sum())
            self.relocations += moved
            return moved

        densifier.relocate = checked_relocate
        self.capacity = densifier.capacity

    def on_train_end(self, trainer, module) -> None:
        local = {k: v.detach().clone() for k, v in module.gaussians.items()}
        torch.save({"local": local, "capacity": self.capacity, "checked": self.checked_rows,
                    "relocated": self.relocations, "total": module.global_gaussian_count()},
                   self.folder / f"{self.tag}_rank{trainer.global_rank}.pt")


def _fit(folder: Path, tag: str, seed: int) -> list[dict]:
    seed_everything(seed)
    config = MCMCConfig(cap_max=CAP, start_images=0, every_images=2, stop_images=1000, min_opacity=0.09)
    module = GaussianSplattingModule(sh_degree=0, densify=config, export_ply=False, backend="torch",
                                     lr_opacities=0.2)
    data = GaussianSplattingDataModule(format="demo", image_width=24, batch_size=2, num_init_points=300)
    trainer = Trainer(
        strategy=GrendelStrategy(start_method="spawn", timeout_s=120), accelerator="cpu", devices=2, max_steps=6,
        limit_val_batches=0, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        default_root_dir=folder, callbacks=[_Watch(folder, tag)],
    )
    trainer.fit(module, data)
    return [torch.load(folder / f"{tag}_rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.timeout(600)
def test_each_shard_keeps_its_budget_and_relocation_is_seeded(tmp_path):
    first = _fit(tmp_path, "a", seed=3)
    assert [r["capacity"] for r in first] == [171, 170]
    assert [r["local"]["means"].shape[0] for r in first] == [171, 170]  # 150 each at the start, grown to the cap
    assert first[0]["total"] == CAP
    # Gaussians initialised at opacity 0.1 with a 0.09 death threshold: some die and are relocated on each rank.
    assert all(r["relocated"] > 0 and r["checked"] >= r["relocated"] for r in first)

    again = _fit(tmp_path, "b", seed=3)
    other = _fit(tmp_path, "c", seed=4)
    for rank in range(2):
        for key, value in first[rank]["local"].items():
            torch.testing.assert_close(again[rank]["local"][key], value, rtol=0, atol=0)
    assert not torch.equal(other[0]["local"]["means"], first[0]["local"]["means"])

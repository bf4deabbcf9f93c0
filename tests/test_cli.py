"""The command line as a user meets it: recipes by name, outputs under --trainer.default_root_dir."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_grendel._recipes import RECIPES_ROOT, RecipeNotFoundError, recipe_names, resolve_config_args
from lightning_grendel.checkpointing import LastCheckpoint


def test_every_shipped_recipe_is_listed_and_resolves_by_name():
    names = recipe_names()
    assert {"gaussian/demo", "gaussian/grendel_cpu", "hyperbolic/cora", "pipeline/tiny_lm_3stages"} <= set(names)
    for name in names:
        assert resolve_config_args(["fit", "-c", name]) == ["fit", "-c", str(RECIPES_ROOT / f"{name}.yaml")]
    assert resolve_config_args(["--config=gaussian/demo.yaml"]) == [f"--config={RECIPES_ROOT / 'gaussian/demo.yaml'}"]
    with pytest.raises(RecipeNotFoundError, match=r"-c gaussian/blendr: .*did you mean gaussian/blender\?"):
        resolve_config_args(["fit", "-c", "gaussian/blendr"])


@pytest.mark.timeout(1200)
def test_recipes_command_lists_names_with_their_summaries():
    out = subprocess.run([sys.executable, "-m", "lightning_grendel", "recipes"], capture_output=True, text=True,
                         check=True, timeout=900).stdout
    assert "gaussian/demo" in out and "procedural demo scene" in out


@pytest.mark.timeout(1200)
def test_default_root_dir_moves_every_output_of_a_run(tmp_path):
    root = tmp_path / "elsewhere"
    subprocess.run([sys.executable, "-m", "lightning_grendel", "fit", "-c", "smoke/gaussian",
                    "--trainer.default_root_dir", str(root), "--trainer.max_steps", "2"],
                   cwd=tmp_path, check=True, timeout=900, capture_output=True)
    run = root / "smoke" / "version_0"
    assert any(p.name.startswith("events.out.tfevents") for p in run.iterdir())
    assert (run / "config.yaml").is_file() and (run / "point_cloud.ply").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]  # nothing written beside it


@pytest.mark.timeout(1200)
def test_a_blender_recipe_without_a_path_names_the_flag(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lightning_grendel", "fit", "-c", "gaussian/blender",
                             "--trainer.default_root_dir", str(tmp_path)], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode != 0 and "--data.path" in result.stderr


def test_every_shipped_recipe_keeps_last_ckpt():
    for name in recipe_names():
        callbacks = yaml.safe_load((RECIPES_ROOT / f"{name}.yaml").read_text())["trainer"].get("callbacks", [])
        assert [c for c in callbacks if c["class_path"] == "lightning_grendel.LastCheckpoint"
                and c["init_args"].get("save_last") and "every_n_train_steps" not in c["init_args"]], name


class _Tiny(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.automatic_optimization = False  # as GaussianSplattingModule

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(self.layer(batch[0]).square().mean())
        optimizer.step()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[0]).square().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("cls", [ModelCheckpoint, LastCheckpoint])
def test_last_checkpoint_holds_the_final_step_between_saves(cls, tmp_path):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=2)  # 4 a epoch
    trainer = Trainer(max_steps=10, check_val_every_n_epoch=2, accelerator="cpu", logger=False,  # as the recipes
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=[cls(dirpath=tmp_path, save_last=True)])
    trainer.fit(_Tiny(), data, data)  # saves after validation at step 8; fit ends at step 10, mid-epoch
    step = torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"]
    assert step == (10 if cls is LastCheckpoint else 8)  # Lightning's own leaves the older one

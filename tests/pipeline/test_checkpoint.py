"""Checkpoints of a pipelined run hold every stage's optimizer state, and resuming continues exactly.

Two stages on three gloo processes: stage 0 data parallel on ranks 1 and 2, stage 1 on rank 0, so
rank 0's optimizer alone has none of stage 0's Adam moments. The reference is the run itself: each
rank's optimizer state at the moment of saving, and the parameters of a run that never stopped.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_grendel.pipeline import Pipeline, PipelineStage, PipelineStrategy
from lightning_grendel.pipeline.checkpoint import merge_states, restrict_state

STAGE_MESHES = [[1, 2], [0]]
STEPS_PER_EPOCH = 3


class _AdamMLP(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.front = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.back = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.back(self.front(x))

    def training_step(self, batch, batch_idx):  # replaced by the pipelined step under the strategy
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.02)

    def pipeline_stages(self) -> Pipeline:
        return Pipeline([PipelineStage(self.front, "S0"), PipelineStage(self.back)], F.cross_entropy)


class _RecordOptimizer(Callback):
    """Each rank writes its optimizer's own state dict: when a checkpoint is saved, and when training starts."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def _write(self, trainer: Trainer, name: str) -> None:
        state = copy.deepcopy(trainer.optimizers[0].state_dict())
        torch.save(state, Path(self.folder) / f"{name}_rank{trainer.global_rank}.pt")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._write(trainer, f"saved_step{trainer.global_step}")

    def on_train_start(self, trainer, pl_module) -> None:
        self._write(trainer, f"start_step{trainer.global_step}")


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(8 * STEPS_PER_EPOCH, 4, generator=generator), torch.randint(0, 3, (8 * STEPS_PER_EPOCH,))
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def _fit(folder: Path, ckpt_path: str | None = None) -> dict[str, torch.Tensor]:
    folder.mkdir(exist_ok=True)
    model = _AdamMLP()
    strategy = PipelineStrategy(stage_meshes=STAGE_MESHES, mesh_shapes=[[2, 1], [1, 1]], num_microbatches=2,
                                start_method="spawn", timeout_s=60)
    saver = ModelCheckpoint(dirpath=folder / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1,
                            save_on_train_epoch_end=True)
    trainer = Trainer(accelerator="cpu", devices=3, strategy=strategy, max_epochs=2, logger=False,
                      callbacks=[saver, _RecordOptimizer(str(folder))], enable_progress_bar=False,
                      enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(model, _loader(), ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(got: dict, want: dict, where: str) -> None:
    assert got["state"].keys() == want["state"].keys(), where
    for index, entry in want["state"].items():
        assert entry.keys() == got["state"][index].keys(), (where, index)
        for key, value in entry.items():
            assert torch.equal(got["state"][index][key], value), (where, index, key)
    assert got["param_groups"] == want["param_groups"], where


@pytest.mark.timeout(420)
def test_resume_restores_every_stage_optimizer_state_and_continues_exactly(tmp_path):
    straight = _fit(tmp_path)
    checkpoint_file = tmp_path / "ckpt" / "epoch=0.ckpt"
    checkpoint = torch.load(checkpoint_file, weights_only=True)
    saved = [torch.load(tmp_path / f"saved_step{STEPS_PER_EPOCH}_rank{r}.pt", weights_only=True) for r in range(3)]
    # Every trainable parameter has Adam moments in the one file, equal to those of every rank holding it.
    (merged,) = checkpoint["optimizer_states"]
    assert sorted(merged["state"]) == list(range(len(list(_AdamMLP().parameters()))))
    for index, entry in merged["state"].items():
        holders = [r for r in range(3) if index in saved[r]["state"]]
        assert holders, index
        for rank in holders:
            _assert_same_state({"state": {index: entry}, "param_groups": merged["param_groups"]},
                               restrict_state(saved[rank], [index]), f"file, parameter {index}, rank {rank}")

    resumed = _fit(tmp_path / "resumed", str(checkpoint_file))
    for rank in range(3):
        start = torch.load(tmp_path / "resumed" / f"start_step{STEPS_PER_EPOCH}_rank{rank}.pt", weights_only=True)
        assert start["state"], f"rank {rank} resumed without optimizer state"
        _assert_same_state(start, saved[rank], f"rank {rank}")
    assert straight.keys() == resumed.keys()
    for key, value in straight.items():
        assert not torch.equal(value, _AdamMLP().state_dict()[key]), key  # training moved every tensor
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=key)


def test_restrict_and_merge_round_trip():
    full = {"state": {0: {"m": torch.ones(1)}, 1: {"m": torch.zeros(1)}, 3: {"m": torch.ones(2)}},
            "param_groups": [{"params": [0, 1, 2, 3]}]}
    parts = [restrict_state(full, {1})["state"], restrict_state(full, {0, 3})["state"]]
    assert list(merge_states(parts)) == [0, 1, 3]
    assert restrict_state(full, {2})["state"] == {}
    with pytest.raises(ValueError, match="came from two ranks"):
        merge_states([parts[0], parts[0]])

"""Trainer level, two chunks per process: 4 chunks on 2 processes (v = 2, interleaved, or in a V with
DualPipeV) train like one process, and the checkpoint holds every chunk's optimiser state (SGD
momentum) equal to the plain run's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_grendel.pipeline import PipelineStrategy
from lightning_grendel.pipeline.examples.tiny_lm import CharTextDataModule, TinyTransformerLM


class _SGDLM(TinyTransformerLM):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _train(strategy, devices: int, folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    torch.manual_seed(0)
    model = _SGDLM(d_model=16, n_heads=2, n_layers=4, seq_len=8, stage_splits=[1, 2, 3])
    saver = ModelCheckpoint(dirpath=folder, filename="last", every_n_epochs=1, save_on_train_epoch_end=True)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=1, logger=False,
                      callbacks=[saver], enable_progress_bar=False, enable_model_summary=False,
                      use_distributed_sampler=False)
    trainer.fit(model, CharTextDataModule(seq_len=8, batch_size=4, num_windows=8))
    checkpoint = torch.load(folder / "last.ckpt", weights_only=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, checkpoint["optimizer_states"][0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule, microbatches", [("interleaved_1f1b", 2), ("dualpipev", 4)])
def test_two_chunks_per_process_train_like_a_single_process(tmp_path, schedule, microbatches):
    plain, plain_state = _train("auto", 1, tmp_path / "plain")
    strategy = PipelineStrategy(schedule=schedule, virtual_stages=2, num_microbatches=microbatches,
                                start_method="spawn", timeout_s=60)
    pipelined, state = _train(strategy, 2, tmp_path / "pipelined")
    for key, value in plain.items():
        torch.testing.assert_close(pipelined[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert state["state"].keys() == plain_state["state"].keys() and len(state["state"]) == len(plain)
    for index, entry in plain_state["state"].items():
        torch.testing.assert_close(state["state"][index]["momentum_buffer"], entry["momentum_buffer"],
                                   rtol=1e-5, atol=1e-6)


def test_virtual_stages_need_an_interleaved_or_v_schedule():
    with pytest.raises(ValueError, match="virtual_stages=2 needs one of"):
        PipelineStrategy(schedule="1f1b", virtual_stages=2)
    with pytest.raises(ValueError, match="'zbv' runs two chunks per stage mesh in a V: virtual_stages must be 2"):
        PipelineStrategy(schedule="zbv")

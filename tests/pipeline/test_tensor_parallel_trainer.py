"""Trainer level: a column-parallel stage on a (1,2) mesh feeding a (2,1) stage equals one process.

Four gloo processes run the recipe's model (recipes/pipeline/tensor_parallel.yaml, smaller): stage 0
computes half of the up-projection's features on each of ranks 0 and 1, and stage 1 gets the rows
split over ranks 2 and 3. The references are autograd on the whole model and a plain
single-process Trainer run of the same model and data.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lightning_grendel.pipeline import PipelineStrategy
from lightning_grendel.pipeline.examples.tiny_lm import CharTextDataModule, TensorParallelMLPLM, lm_loss

LR = 0.5
STAGE_PARAMETERS = [("embed.", "up."), ("down.", "head.")]


class _SGDLM(TensorParallelMLPLM):
    """SGD, so parameters after a step reflect every gradient error (Adam's first step is ``-lr·sign(g)``)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


class _RecordFirstStep(Callback):
    """Each rank writes the loss of the first batch and the gradients it holds right before the first step."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.record: dict = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            self.record["grads"] = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.record["loss"] = outputs["loss"].detach().clone()
            torch.save(self.record, Path(self.folder) / f"rank{trainer.global_rank}.pt")


def _model() -> _SGDLM:
    torch.manual_seed(0)
    return _SGDLM(d_model=8, hidden=16, seq_len=8, stage_input_specs=["R", "S0"])


def _data() -> CharTextDataModule:
    return CharTextDataModule(seq_len=8, batch_size=8, num_windows=32)


def _fit(strategy, devices: int, callbacks: list) -> dict[str, torch.Tensor]:
    model = _model()
    trainer = Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=2, logger=False,
                      callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(model, _data())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _first_batch_reference() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    data = _data()
    data.setup("fit")
    ids, target = next(iter(data.train_dataloader()))
    model = _model()
    loss = lm_loss(model(ids), target)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_relative(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=what)


@pytest.mark.timeout(420)
def test_tensor_parallel_stage_matches_one_process(tmp_path):
    strategy = PipelineStrategy(stage_meshes=[[0, 1], [2, 3]], mesh_shapes=[[1, 2], [2, 1]], num_microbatches=2,
                                start_method="spawn", timeout_s=60)
    pipelined = _fit(strategy, 4, [_RecordFirstStep(str(tmp_path))])
    want_loss, want_grads = _first_batch_reference()
    for rank in range(4):
        record = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(record["loss"], want_loss, rtol=1e-5, atol=0, msg=f"loss on rank {rank}")
        prefixes = STAGE_PARAMETERS[rank // 2]
        assert sorted(record["grads"]) == sorted(n for n in want_grads if n.startswith(prefixes)), rank
        for name, grad in record["grads"].items():  # both TP ranks hold the full up-projection gradient
            _assert_relative(grad, want_grads[name], f"{name} on rank {rank}")
    plain = _fit("auto", 1, [])
    start = _model().state_dict()
    assert pipelined.keys() == plain.keys()
    for key, value in plain.items():
        assert not torch.equal(value, start[key]), key
        _assert_relative(pipelined[key], value, key)

"""Trainer level: the example project trained as a 3-stage pipeline ends with the weights of a plain run."""

from __future__ import annotations

import sys

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_grendel.pipeline import PipelineStrategy
from tests.helpers.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "examples" / "pipeline"))

from classifier_pipelined import SpiralClassifier, SpiralData  # noqa: E402


def _train(strategy, devices: int, steps: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = SpiralClassifier(hidden=16)
    # Lightning shuffles training data whenever it inserts a distributed sampler; keep the plain order here
    # so both runs see the same batches (the pipeline itself only needs every rank to see the same batch).
    trainer = Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      use_distributed_sampler=False)
    trainer.fit(model, SpiralData(num_points=256, batch_size=32))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.timeout(300)
def test_three_stage_pipeline_trains_like_a_single_process():
    plain = _train("auto", 1, steps=4)
    pipelined = _train(PipelineStrategy(schedule="eager_1f1b", executor="broadcast", num_microbatches=4,
                                        start_method="spawn", timeout_s=60), 3, steps=4)
    start = SpiralClassifier(hidden=16)
    assert plain.keys() == pipelined.keys()
    for key, value in plain.items():
        assert not torch.equal(value, start.state_dict()[key]) or "bias" in key  # training moved the weights
        torch.testing.assert_close(pipelined[key], value, rtol=1e-5, atol=1e-6, msg=key)

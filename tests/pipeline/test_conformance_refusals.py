"""The Trainer settings PipelineStrategy refuses: one clear error naming each, before anything runs or is written.

Most are checked on a Trainer that is built but never started (no process launched); one fit shows
the error comes out of ``Trainer.fit`` before the logger has written a file.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import StochasticWeightAveraging
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from lightning_grendel.pipeline import PipelineStrategy
from lightning_grendel.pipeline.flags import check_trainer, refusals
from lightning_grendel.pipeline.stages import Pipeline, PipelineStage
from tests.helpers.conformance import SEQ, ConformanceData, ConformanceLM


def _model() -> ConformanceLM:
    torch.manual_seed(0)
    return ConformanceLM()


def _refusals(model: ConformanceLM, fn: TrainerFn = TrainerFn.FITTING, **trainer_kwargs) -> list[str]:
    trainer = Trainer(accelerator="cpu", devices=2, strategy=PipelineStrategy(), logger=False, **trainer_kwargs)
    trainer.state.fn = fn
    return refusals(trainer, model)


class _ManualLM(ConformanceLM):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class _OwnClippingLM(ConformanceLM):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        torch.nn.utils.clip_grad_norm_(self.parameters(), 1.0)


class _BatchNormLM(ConformanceLM):
    def __init__(self) -> None:
        super().__init__()
        self.down.append(nn.BatchNorm1d(SEQ))


class _TwoOptimizersLM(ConformanceLM):
    def pipeline_stages(self) -> Pipeline:  # one stage: the fit below runs on one process
        return Pipeline([PipelineStage(nn.Sequential(self.embed, self.up, self.down, self.head))])

    def configure_optimizers(self):
        return [torch.optim.SGD(self.embed.parameters(), lr=0.1), torch.optim.SGD(self.head.parameters(), lr=0.1)]


class _CustomPrecision(Precision):
    """Stands for any plugin not tested in a pipeline (transformer-engine, bitsandbytes, ...)."""


def test_the_supported_configuration_has_no_refusal():
    assert _refusals(_model(), precision="bf16-mixed", gradient_clip_val=1.0, accumulate_grad_batches=2) == []


@pytest.mark.parametrize(("model", "kwargs", "names"), [
    pytest.param(_ManualLM, {}, "automatic_optimization = False", id="manual-optimisation"),
    pytest.param(_OwnClippingLM, {}, "configure_gradient_clipping", id="configure-gradient-clipping"),
    pytest.param(_BatchNormLM, {}, "BatchNorm", id="batchnorm"),
    pytest.param(_BatchNormLM, {"sync_batchnorm": True}, "sync_batchnorm", id="sync-batchnorm"),
    pytest.param(ConformanceLM, {"callbacks": [StochasticWeightAveraging(swa_lrs=0.1)]}, "StochasticWeightAveraging",
                 id="swa"),
    pytest.param(ConformanceLM, {"plugins": [MixedPrecision("16-mixed", "cpu")]},
                 "precision='16-mixed' trains with a GradScaler", id="16-mixed-gradscaler"),
    pytest.param(ConformanceLM, {"plugins": [_CustomPrecision()]}, "precision plugin _CustomPrecision is not supported",
                 id="other-precision-plugin"),
])
def test_each_refusal_names_its_flag(model, kwargs, names):
    problems = _refusals(model(), **kwargs)
    assert len(problems) == 1 and names in problems[0], problems


def test_every_refusal_comes_in_one_error():
    trainer = Trainer(accelerator="cpu", devices=2, strategy=PipelineStrategy(), logger=False,
                      plugins=[MixedPrecision("16-mixed", "cpu")], callbacks=[StochasticWeightAveraging(swa_lrs=0.1)])
    trainer.state.fn = TrainerFn.FITTING
    with pytest.raises(ValueError, match="(?s)GradScaler.*automatic_optimization.*StochasticWeightAveraging"):
        check_trainer(trainer, _ManualLM())


def test_evaluation_refuses_only_what_evaluation_uses():
    """A GradScaler, manual optimisation and SWA only matter when training."""
    kwargs = {"plugins": [MixedPrecision("16-mixed", "cpu")], "callbacks": [StochasticWeightAveraging(swa_lrs=0.1)]}
    assert _refusals(_ManualLM(), TrainerFn.VALIDATING, **kwargs) == []
    assert _refusals(_model(), TrainerFn.TESTING, plugins=[_CustomPrecision()])


@pytest.fixture
def one_thread(monkeypatch):
    """Lightning's launcher sets torch's thread count unless OMP_NUM_THREADS is set: keep it for later tests."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.mark.timeout(120)
def test_fit_raises_before_the_logger_writes(tmp_path, one_thread):
    trainer = Trainer(accelerator="cpu", devices=1, strategy=PipelineStrategy(), logger=CSVLogger(tmp_path),
                      callbacks=[StochasticWeightAveraging(swa_lrs=0.1)], enable_progress_bar=False)
    with pytest.raises(ValueError, match="StochasticWeightAveraging"):
        trainer.fit(_model(), ConformanceData())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(120)
def test_several_optimisers_are_refused_by_lightning_itself(one_thread):
    """Automatic optimisation takes one optimiser (Lightning's own error); manual optimisation is refused above."""
    trainer = Trainer(accelerator="cpu", devices=1, strategy=PipelineStrategy(), logger=False,
                      enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="multiple optimizers is only supported with manual"):
        trainer.fit(_TwoOptimizersLM(), ConformanceData())

"""The Trainer-feature conformance cells: one model, one data module, one run function for both sides.

Each cell is a Trainer configuration run once unpipelined (one process) and once with
``PipelineStrategy`` on 4 ranks. Every rank of the pipelined side runs every cell in a row inside one
``run_distributed`` launch: with ``LOCAL_RANK`` set, Lightning's launcher only calls the function and
the process group that ``run_distributed`` made is reused, so no cell pays for starting processes.

Stage layouts (4 ranks, two stages):

- ``exact``: both stages on two replicas (``R``), one micro-batch, no tensor parallelism. Every
  reduction adds identical values, so the pipelined run repeats the plain run's arithmetic; used to
  compare low precisions tightly.
- ``tp``: stage 0 column-parallel over a (1, 2) mesh (its embedding replicated on both), stage 1 data
  parallel over a (2, 1) mesh, 2 micro-batches.
- ``dp``: the same meshes without tensor parallelism (both stages data parallel); used where
  validation runs.
- ``other``: stage 0 column-parallel over 3 ranks, stage 1 on the last: a resume target with other meshes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.callbacks import timer as timer_module
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_grendel.pipeline import PipelineStrategy
from lightning_grendel.pipeline.examples.tiny_lm import TensorParallelMLPLM, lm_loss
from lightning_grendel.pipeline.stages import Pipeline

SEQ, VOCAB, WORLD = 8, 64, 4
LAYOUTS = {
    "exact": dict(stage_meshes=[[0, 1], [2, 3]], mesh_shapes=[[1, 2], [1, 2]], specs=["R", "R"], tp=False,
                  num_microbatches=1),
    "tp": dict(stage_meshes=[[0, 1], [2, 3]], mesh_shapes=[[1, 2], [2, 1]], specs=["R", "S0"], tp=True,
               num_microbatches=2),
    "dp": dict(stage_meshes=[[0, 1], [2, 3]], mesh_shapes=[[1, 2], [2, 1]], specs=["S1", "S0"], tp=False,
               num_microbatches=2),
    "other": dict(stage_meshes=[[0, 1, 2], [3]], mesh_shapes=[[1, 3], [1, 1]], specs=["R", "R"], tp=True,
                  num_microbatches=2),
}


class _FP32Linear(nn.Linear):
    """Logits with autocast off, as LM heads often are: under bf16-mixed its backward must stay float32 too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):  # the tests run on CPU (a meta input has no autocast)
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class ConformanceLM(TensorParallelMLPLM):
    """The tensor-parallel MLP LM with evaluation steps and a choice of optimiser and LR schedulers.

    ``optimizer``: ``sgd`` or ``adam`` (two param groups, one per stage, different learning rates).
    ``schedulers``: any of ``lambda_step`` (LambdaLR stepped per step), ``step_epoch`` (StepLR per
    epoch), ``plateau`` (ReduceLROnPlateau on ``val/loss``).
    """

    def __init__(self, tensor_parallel: bool = False, stage_input_specs: list[str] | None = None,
                 optimizer: str = "sgd", schedulers: tuple[str, ...] = ()) -> None:
        super().__init__(vocab_size=VOCAB, d_model=8, hidden=16, seq_len=SEQ, stage_input_specs=stage_input_specs,
                         tensor_parallel=tensor_parallel)
        self.head.out = _FP32Linear(8, VOCAB)
        self.optimizer_name, self.scheduler_names = optimizer, schedulers

    def pipeline_stages(self) -> Pipeline:
        """The stages without a loss: the module's own ``training_step`` is the loss, as for most users."""
        return Pipeline(super().pipeline_stages().stages)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return lm_loss(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self._loss(batch))

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).float()

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=0.5)
        else:
            front = [*self.embed.parameters(), *self.up.parameters()]
            back = [*self.down.parameters(), *self.head.parameters()]
            optimizer = torch.optim.Adam([{"params": front, "lr": 0.01}, {"params": back, "lr": 0.02}])
        schedulers = {
            "lambda_step": {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s)),
                            "interval": "step"},
            "step_epoch": {"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)},
            "plateau": {"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0),
                        "monitor": "val/loss"},
        }
        return [optimizer], [schedulers[name] for name in self.scheduler_names]


class SyncDistLM(ConformanceLM):
    """Logs with ``sync_dist=True`` in its steps (the plain run's values) and in a hook (per-rank values).

    The hook logs the rank: with ``sync_dist`` Lightning reduces it over the ranks as under DDP, so the
    pipelined run logs their mean (1.5 on 4 ranks) and sum (6) where the plain run logs 0.
    """

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss_sync", loss, sync_dist=True)
        self.log("train/loss_total", loss * len(batch[0]), sync_dist=True, reduce_fx="sum")
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch), sync_dist=True)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        rank = float(self.global_rank)
        self.log("hook/rank_mean", rank, sync_dist=True)
        self.log("hook/rank_sum", rank, sync_dist=True, reduce_fx="sum")
        self.log("hook/rank_epoch", rank, sync_dist=True, on_step=False, on_epoch=True)


def _windows(count: int, seed: int) -> TensorDataset:
    tokens = torch.randint(0, VOCAB, (count, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


class ConformanceData(LightningDataModule):
    """Random token windows: 32 to train (4 batches of 8 by default), 2 batches of 8 each to validate, test, predict."""

    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_windows(32, 0), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_windows(16, 1), batch_size=8, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(_windows(16, 2), batch_size=8, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(_windows(16, 3), batch_size=8, shuffle=False)


class RecordingLogger(Logger):
    """Keeps every logged metric on every rank (Lightning's loggers write on rank 0 only)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, {k: float(v) for k, v in metrics.items() if k != "epoch"}))


class _StepClock:
    """A clock that advances one second per reading, so ``max_time`` stops after a fixed number of batches."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += 1.0
        return self.now


@dataclass(frozen=True)
class Cell:
    """A Trainer configuration: ``trainer`` kwargs, model options, callbacks by name, what to run.

    ``plain`` replaces Trainer kwargs and ``plain_batch_size`` the batch size of the unpipelined run,
    for a reference that computes at the pipeline's micro-batch granularity.
    """

    layout: str = "tp"
    trainer: dict = field(default_factory=dict)
    optimizer: str = "sgd"
    schedulers: tuple[str, ...] = ()
    callbacks: tuple[str, ...] = ()
    run: str = "fit"  # fit, evaluate (fit then validate/test/predict), max_time (fit on a step clock)
    plain: dict = field(default_factory=dict)
    plain_batch_size: int = 8
    sync_logs: bool = False  # the module is SyncDistLM


CELLS = {
    "32-true": Cell("exact", {"precision": "32-true"}),
    "64-true": Cell("exact", {"precision": "64-true"}),
    "bf16-true": Cell("exact", {"precision": "bf16-true"}),
    "16-true": Cell("exact", {"precision": "16-true"}),
    "bf16-mixed": Cell("exact", {"precision": "bf16-mixed"}),
    "16-mixed-cpu": Cell("exact", {"precision": "16-mixed"}),
    # 2 micro-batches x 2 data-parallel ranks: each gradient piece is a bf16 product over 2 rows, summed in
    # float32, as in a plain run over batches of 2 accumulated 4 at a time (the same loss weights, 1/4).
    "bf16-mixed-micro-batches": Cell("dp", {"precision": "bf16-mixed", "limit_val_batches": 0},
                                     plain={"accumulate_grad_batches": 4}, plain_batch_size=2),
    "clip-norm": Cell("tp", {"gradient_clip_val": 0.05}),
    "clip-value": Cell("tp", {"gradient_clip_val": 0.002, "gradient_clip_algorithm": "value"}),
    # replicas that count no gradient must still scale by the factor torch computes in bfloat16
    "clip-norm-bf16-true": Cell("exact", {"precision": "bf16-true", "gradient_clip_val": 0.05}),
    "accumulate": Cell("tp", {"accumulate_grad_batches": 3, "gradient_clip_val": 0.05}),
    "checkpoint-monitor": Cell("dp", {"max_epochs": 3}, callbacks=("best_val", "best_train")),
    "early-stopping": Cell("dp", {"max_epochs": 6}, callbacks=("early_stop",)),
    "lr-monitor-step-schedule": Cell("dp", {}, "adam", ("lambda_step",), ("lr_step",)),
    "epoch-schedules": Cell("dp", {"max_epochs": 3}, "adam", ("step_epoch", "plateau"), ("lr_epoch",)),
    "max-time": Cell("tp", {"max_time": {"seconds": 4}, "max_epochs": 3}, run="max_time"),
    "val-check-interval": Cell("dp", {"val_check_interval": 2, "num_sanity_val_steps": -1, "max_epochs": 1}),
    "limit-batches": Cell("dp", {"limit_train_batches": 3, "limit_val_batches": 1}),
    "fast-dev-run": Cell("dp", {"fast_dev_run": True}),
    "overfit-batches": Cell("dp", {"overfit_batches": 2, "max_epochs": 3}),
    "deterministic": Cell("tp", {"deterministic": True}),
    "detect-anomaly": Cell("tp", {"detect_anomaly": True}),
    # Lightning's default use_distributed_sampler: the strategy must keep the loader's order all the same
    "sync-dist": Cell("dp", {"max_epochs": 1, "use_distributed_sampler": True}, sync_logs=True),
    "evaluate": Cell("dp", {"max_epochs": 1, "limit_test_batches": 1, "limit_predict_batches": 1}, run="evaluate"),
}


def _callbacks(names: tuple[str, ...], folder: Path) -> list:
    makers = {
        "best_val": lambda: ModelCheckpoint(dirpath=folder / "val", filename="{epoch}-{step}", monitor="val/loss",
                                            save_top_k=2),
        "best_train": lambda: ModelCheckpoint(dirpath=folder / "train", filename="{step}", monitor="train/loss",
                                              save_top_k=1, every_n_train_steps=1),
        "early_stop": lambda: EarlyStopping(monitor="val/loss", min_delta=1.0, patience=1),
        "lr_step": lambda: LearningRateMonitor(logging_interval="step"),
        "lr_epoch": lambda: LearningRateMonitor(logging_interval="epoch"),
        "last": lambda: ModelCheckpoint(dirpath=folder, filename="last", save_on_train_epoch_end=True),
    }
    return [makers[name]() for name in names]


def make_model(layout: str, optimizer: str = "sgd", schedulers: tuple[str, ...] = (),
               sync_logs: bool = False) -> ConformanceLM:
    torch.manual_seed(0)
    spec = LAYOUTS[layout]
    return (SyncDistLM if sync_logs else ConformanceLM)(spec["tp"], spec["specs"], optimizer, schedulers)


def pipeline_strategy(layout: str) -> PipelineStrategy:
    spec = LAYOUTS[layout]
    return PipelineStrategy(stage_meshes=spec["stage_meshes"], mesh_shapes=spec["mesh_shapes"],
                            num_microbatches=spec["num_microbatches"], timeout_s=60)


def _trainer(pipelined: bool, layout: str, folder: Path, callbacks: tuple[str, ...] = (), **kwargs: Any) -> Trainer:
    if pipelined:  # Lightning's launcher then calls the function in this process, in the existing group
        os.environ.update(LOCAL_RANK=str(torch.distributed.get_rank()), NODE_RANK="0")
    made = _callbacks(callbacks, folder)
    # deterministic=False resets torch's global switch after the cell that turns it on
    options = dict(max_epochs=2, log_every_n_steps=1, limit_val_batches=None if layout == "dp" else 0,
                   enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in made), deterministic=False,
                   use_distributed_sampler=False)
    options.update(kwargs)
    return Trainer(accelerator="cpu", devices=WORLD if pipelined else 1,
                   strategy=pipeline_strategy(layout) if pipelined else "auto", logger=RecordingLogger(),
                   callbacks=made, enable_progress_bar=False, enable_model_summary=False, **options)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _checkpoint_summary(trainer: Trainer) -> list[dict]:
    """Per ModelCheckpoint: the kept files (names) with their scores, and the best file's weights."""
    summary = []
    for callback in trainer.checkpoint_callbacks:
        best = torch.load(callback.best_model_path, weights_only=True)["state_dict"]
        summary.append({"best": Path(callback.best_model_path).name,
                        "kept": {Path(p).name: float(s) for p, s in callback.best_k_models.items()},
                        "best_weights": best})
    return summary


def run_cell(name: str, pipelined: bool, folder: Path) -> dict:
    """Run cell ``name`` (on the pipeline when ``pipelined``); what the comparison needs, picklable."""
    cell = CELLS[name]
    folder.mkdir(parents=True, exist_ok=True)
    model = make_model(cell.layout, cell.optimizer, cell.schedulers, cell.sync_logs)
    options = cell.trainer if pipelined else {**cell.trainer, **cell.plain}
    trainer = _trainer(pipelined, cell.layout, folder, cell.callbacks, **options)
    data = ConformanceData(8 if pipelined else cell.plain_batch_size)
    result: dict[str, Any] = {}
    if cell.run == "max_time":
        real_time, timer_module.time = timer_module.time, SimpleNamespace(monotonic=_StepClock().monotonic)
        try:
            trainer.fit(model, data)
        finally:
            timer_module.time = real_time
    else:
        trainer.fit(model, data)
    if cell.run == "evaluate":
        result["validate"] = trainer.validate(model, ConformanceData(), verbose=False)
        result["test"] = trainer.test(model, ConformanceData(), verbose=False)
        predictions = trainer.predict(model, ConformanceData())
        result["predict"] = None if not predictions else [p.detach().clone() for p in predictions]
    result.update(weights=_weights(model), global_step=trainer.global_step,
                  logged=trainer.logger.records if isinstance(trainer.logger, RecordingLogger) else None,
                  checkpoints=_checkpoint_summary(trainer) if trainer.checkpoint_callbacks else [],
                  dtype=str(next(model.parameters()).dtype),
                  sampler=type(getattr(trainer.train_dataloader, "sampler", None)).__name__)
    return result


def resume(pipelined: bool, layout: str, folder: Path, ckpt_path: Path | None, max_epochs: int) -> dict:
    """Adam with a per-step LambdaLR to ``max_epochs``, from ``ckpt_path`` if given; ``folder/last.ckpt`` at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    model = make_model(layout, "adam", ("lambda_step",))
    trainer = _trainer(pipelined, layout, folder, ("last",), max_epochs=max_epochs)
    trainer.fit(model, ConformanceData(), ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    return {"weights": _weights(model), "global_step": trainer.global_step}

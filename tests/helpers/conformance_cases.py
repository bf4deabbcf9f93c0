"""Trainer features run on a tiny demo scene, once on one process and once on every rank of a gloo group.

:func:`run_cases` runs the same short Trainers in a row, either with Lightning's single-device
strategy (the reference) or, inside :func:`~tests.helpers.distributed.run_distributed`, with a
GrendelStrategy whose cluster environment does not launch processes (``LOCAL_RANK``/``WORLD_SIZE`` are
set and the process group is already up, so ``_init_dist_connection`` skips it). Each case returns
what its cell of docs/grendel_conformance.md compares; everything returned is picklable.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor

from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.densify import DensifyConfig
from lightning_grendel.splatting.mcmc import MCMCConfig
from lightning_grendel.splatting.module import GaussianSplattingModule

SCALE_REG = 0.05
NO_DENSIFY = DensifyConfig(start_images=10**6, opacity_reset_every_images=0)
CLONE_ONLY = DensifyConfig(start_images=2, every_images=4, stop_images=1000, dense_fraction=100.0,
                           grad_threshold=2e-5, opacity_reset_every_images=0)  # every candidate is small: clones


class ScaleRegularised(GaussianSplattingModule):
    """The docs' example: a scale regulariser written with gaussian_mean (never scales.mean())."""

    def regularization(self) -> Tensor:
        return super().regularization() + SCALE_REG * self.gaussian_mean(self.gaussians["scales"].exp())


def make_module(kind: type[GaussianSplattingModule] = GaussianSplattingModule, **kwargs: Any) -> Any:
    options = {"sh_degree": 1, "sh_degree_interval": 4, "densify": NO_DENSIFY, "backend": "torch", **kwargs}
    return kind(**options)


class Recorder(Callback):
    """Step metrics, validation metrics, the gradients of the first steps and the Gaussians at the end."""

    def __init__(self, grad_steps: int = 0) -> None:
        self.steps: list[dict[str, float]] = []
        self.validations: list[dict[str, float]] = []
        self.grads: list[dict[str, Tensor]] = []
        self.exchange: list[tuple[dict[str, float], dict[str, float]]] = []  # (this rank's, logged)
        self.grad_steps = grad_steps
        self.gaussians: dict[str, Tensor] | None = None
        self.dtype: torch.dtype | None = None

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if len(self.grads) < self.grad_steps:
            self.grads.append({key: p.grad.detach().clone() for key, p in module.gaussians.items()})

    def on_train_batch_end(self, trainer, module, *args: Any) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        self.steps.append({"step": trainer.global_step, **metrics})
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("renderer/")}
        self.exchange.append((dict(module.renderer.last_stats), logged))

    def on_validation_end(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            self.validations.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})

    def on_train_end(self, trainer, module) -> None:
        self.gaussians = module.gathered_gaussians()  # a collective: every rank joins; None off rank 0
        self.dtype = module.gaussians["means"].dtype

    def result(self) -> dict[str, Any]:
        return {"steps": self.steps, "validations": self.validations, "grads": self.grads,
                "gaussians": self.gaussians, "dtype": self.dtype, "exchange": self.exchange}


def _trainer(strategy: Any, world: int, root: Path, **kwargs: Any) -> Trainer:
    options = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
               "enable_model_summary": False, "limit_val_batches": 0, "default_root_dir": root, **kwargs}
    if strategy is None:
        return Trainer(accelerator="cpu", devices=1, **options)
    return Trainer(strategy=strategy(), accelerator="cpu", devices=world, **options)


def _fit(strategy, world, root, module=None, data=None, ckpt_path=None, grad_steps=0, callbacks=(), **kwargs):
    recorder = Recorder(grad_steps)
    trainer = _trainer(strategy, world, root, callbacks=[recorder, *callbacks], **kwargs)
    trainer.fit(module or make_module(), data, ckpt_path=ckpt_path)
    return trainer, recorder.result()


def run_cases(strategy: Any, world: int, folder: Path, data: GaussianSplattingDataModule,
              early_stop_threshold: float | None, resume_from: Path | None) -> dict[str, Any]:
    """Every case in a row; ``strategy`` is None for the single-process reference or a strategy factory."""
    out: dict[str, Any] = {}

    # Metrics, item 2's regulariser, clone-only densification, ModelCheckpoint(monitor), LearningRateMonitor,
    # val_check_interval, num_sanity_val_steps, deterministic: one fit.
    checkpoint = ModelCheckpoint(dirpath=folder / "main" / "ckpt", monitor="train/loss", mode="min", save_top_k=2,
                                 every_n_train_steps=1)
    lr_monitor = LearningRateMonitor(logging_interval="step")
    trainer, out["main"] = _fit(
        strategy, world, folder / "main", make_module(ScaleRegularised, densify=CLONE_ONLY), data, grad_steps=1,
        callbacks=[checkpoint, lr_monitor], max_steps=6, val_check_interval=3, limit_val_batches=2,
        num_sanity_val_steps=1, deterministic=True, logger=CSVLogger(folder / "main", name="csv", version=0),
        log_every_n_steps=1, enable_checkpointing=True,
    )
    torch.use_deterministic_algorithms(False)  # Trainer(deterministic=True) sets it for the whole process
    out["main"]["best_k"] = {Path(path).name: float(score) for path, score in checkpoint.best_k_models.items()}
    out["main"]["best"] = Path(checkpoint.best_model_path).name
    out["main"]["on_disk"] = sorted(p.name for p in (folder / "main" / "ckpt").iterdir())
    out["main"]["lrs"] = {name: list(values) for name, values in lr_monitor.lrs.items()}

    # MCMC's opacity and scale regularisers (no relocation, no noise: both draw random numbers per shard).
    mcmc = MCMCConfig(start_images=10**6, noise_lr=0.0, opacity_reg=0.02, scale_reg=0.03)
    _, out["mcmc"] = _fit(strategy, world, folder / "mcmc", make_module(densify=mcmc), data, grad_steps=2,
                          max_steps=2)

    # Gradient clipping through the module's arguments (Trainer(gradient_clip_val) is refused).
    _, out["clip_norm"] = _fit(strategy, world, folder / "clip_norm",
                               make_module(gradient_clip_val=1e-3, gradient_clip_algorithm="norm"), data,
                               grad_steps=2, max_steps=2)
    _, out["clip_value"] = _fit(strategy, world, folder / "clip_value",
                                make_module(gradient_clip_val=1e-5, gradient_clip_algorithm="value"), data,
                                grad_steps=1, max_steps=1)

    # limit_train_batches / limit_val_batches over epochs; the reference's epoch losses pick the threshold
    # of the EarlyStopping case below.
    _, out["limits"] = _fit(strategy, world, folder / "limits", make_module(), data, max_epochs=3,
                            limit_train_batches=2, limit_val_batches=1)

    if early_stop_threshold is not None:
        out["early_stop"] = early_stop_case(strategy, world, folder, data, early_stop_threshold)

    # max_time: rank 0's clock decides, broadcast to every rank (Lightning's Timer).
    trainer, out["max_time"] = _fit(strategy, world, folder / "max_time", make_module(), data,
                                    max_time=timedelta(seconds=1), max_steps=10**4)
    out["max_time"]["global_step"] = trainer.global_step

    # fast_dev_run writes nothing (no logs, checkpoints or PLY) and runs one batch of each loop.
    (folder / "fast_dev_run").mkdir(parents=True, exist_ok=True)
    _, out["fast_dev_run"] = _fit(strategy, world, folder / "fast_dev_run", make_module(export_ply=True), data,
                                  fast_dev_run=1, logger=True, enable_checkpointing=True)
    out["fast_dev_run"]["written"] = sorted(str(p) for p in (folder / "fast_dev_run").rglob("*"))

    _, out["overfit"] = _fit(strategy, world, folder / "overfit", make_module(), data, overfit_batches=1,
                             max_steps=3)
    _, out["float64"] = _fit(strategy, world, folder / "float64", make_module(), data, precision="64-true",
                             max_steps=2)

    # Trainer.validate / test / predict on a fresh module.
    evaluate = _trainer(strategy, world, folder / "evaluate", limit_val_batches=2, limit_test_batches=2,
                        limit_predict_batches=2)
    module = make_module()
    out["validate"] = [{k: float(v) for k, v in row.items()} for row in evaluate.validate(module, data, verbose=False)]
    out["test"] = [{k: float(v) for k, v in row.items()} for row in evaluate.test(module, data, verbose=False)]
    out["predict"] = [image.clone() for image in evaluate.predict(module, data)]

    # Resume from a checkpoint written on one process (1 -> W ranks) and train two more steps.
    if resume_from is not None:
        _, out["resume"] = _fit(strategy, world, folder / "resume", make_module(), data, ckpt_path=resume_from,
                                max_steps=4, grad_steps=1)
    return out


def early_stop_case(strategy: Any, world: int, folder: Path, data: GaussianSplattingDataModule,
                    threshold: float) -> dict[str, Any]:
    """EarlyStopping on ``train/loss`` (the same training as the ``limits`` case, which picks ``threshold``)."""
    stop = EarlyStopping(monitor="train/loss", mode="min", stopping_threshold=threshold, check_on_train_epoch_end=True,
                         patience=100)
    trainer, out = _fit(strategy, world, folder / "early_stop", make_module(), data, callbacks=[stop], max_epochs=5,
                        limit_train_batches=2)
    return {**out, "stopped_epoch": stop.stopped_epoch, "global_step": trainer.global_step}


def write_resume_checkpoint(folder: Path, data: GaussianSplattingDataModule) -> Path:
    """Two steps on one process, saved as a ``.ckpt`` file (what the resume case starts from)."""
    checkpoint = ModelCheckpoint(dirpath=folder / "first", save_last=True)
    trainer = _trainer(None, 1, folder / "first", callbacks=[checkpoint], enable_checkpointing=True, max_steps=2)
    trainer.fit(make_module(), data)
    return Path(checkpoint.last_model_path)


def demo_data() -> GaussianSplattingDataModule:
    return GaussianSplattingDataModule(format="demo", image_width=24, batch_size=2, num_init_points=240)


def grendel_ranks(rank: int, world: int, folder: str, early_stop_threshold: float, resume_from: str) -> dict:
    """Run on every rank of :func:`run_distributed`: :func:`run_cases` under GrendelStrategy."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    from lightning_grendel.splatting.grendel import GrendelStrategy

    os.environ.update(LOCAL_RANK=str(rank), WORLD_SIZE=str(world), NODE_RANK="0")

    def strategy() -> GrendelStrategy:
        return GrendelStrategy(cluster_environment=LightningEnvironment(), timeout_s=120)

    out = run_cases(strategy, world, Path(folder), demo_data(), early_stop_threshold, Path(resume_from))
    out["mismatch"] = _render_other_cameras(rank)
    return out


def _render_other_cameras(rank: int) -> str:
    """Rank r renders camera r: the renderer must refuse on every rank instead of stitching different views."""
    from lightning_grendel.splatting.gaussians import make_parameters
    from lightning_grendel.splatting.grendel.balancer import LoadBalancer
    from lightning_grendel.splatting.grendel.renderer import GrendelRenderer
    from tests.helpers.scenes import orbit_cameras, random_gaussians

    cameras = orbit_cameras(4, 16, 16)[rank % 4 : rank % 4 + 1]
    params = make_parameters(random_gaussians(20, seed=rank, sh_degree=0))
    try:
        GrendelRenderer(LoadBalancer(), backend="torch").render_full(params, cameras, 0, torch.zeros(3))
    except RuntimeError as error:
        return str(error)
    return ""

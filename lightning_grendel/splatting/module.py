"""GaussianSplattingModule: 3DGS training as a LightningModule, on one process or under GrendelStrategy.

The module talks to the strategy through the contracts in :mod:`lightning_grendel.splatting.protocols`,
so a user's own Gaussian module can follow them: it renders through ``self.renderer`` (a ``Renderer``,
which the strategy may replace; the loss covers exactly the rows rendered here), and when the strategy
is a ``GaussianShardingStrategy`` it keeps the rows ``shard_indices(n)`` of the initial points, calls
``after_density_change`` after densification and ``gather_gaussians`` to export a PLY.
Optimisation is manual because densification changes the number of parameters.

Losses are scene-wide on every rank. Under GrendelStrategy a rank holds a shard of the Gaussians and
renders a strip of each image; :meth:`GaussianSplattingModule.render_loss` adds the ranks' strip losses
up (:meth:`~GaussianSplattingModule.sum_over_ranks`), so ``train/loss`` and everything logged is the
number one process would get, on every rank. A regulariser over the Gaussians must do the same: write it
with :meth:`~GaussianSplattingModule.gaussian_mean` / :meth:`~GaussianSplattingModule.gaussian_sum` in an
override of :meth:`~GaussianSplattingModule.regularization`. **A plain** ``self.gaussians[...].mean()``
**is the mean of this rank's shard only: added on every rank, its gradients scale with the world size
(W times the single-process gradient on W ranks), each rank logs another value, and nothing can detect
it.** For example::

    class SmallSplats(GaussianSplattingModule):
        def regularization(self) -> Tensor:
            scales = self.gaussians["scales"].exp()
            return super().regularization() + 0.01 * self.gaussian_mean(scales)  # not scales.mean()

Trainer flags the module cannot honour are refused before the run starts (``check_trainer``); which
flags work, and the test of each, is in docs/grendel_conformance.md.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from lightning_grendel.splatting.batching import BatchScaling, scale_adam_hyperparameters
from lightning_grendel.splatting.cameras import Cameras, scene_extent
from lightning_grendel.splatting.coarse_to_fine import CoarseToFine, ResolutionSchedule, band_energy, downsampled_batch
from lightning_grendel.splatting.densify import DensifyConfig
from lightning_grendel.splatting.fit_summary import fit_summary
from lightning_grendel.splatting.gaussians import PARAM_KEYS, init_from_points, make_parameters
from lightning_grendel.splatting.grendel.checkpoint import CheckedCheckpointIO
from lightning_grendel.splatting.guards import FiniteGuard, NonFiniteMode
from lightning_grendel.splatting.init_file import gaussians_from_file
from lightning_grendel.splatting.losses import SSIM_HALO, strip_loss
from lightning_grendel.splatting.mcmc import MCMCConfig, make_densifier
from lightning_grendel.splatting.metrics import lpips, make_lpips, psnr, ssim
from lightning_grendel.splatting.ply import save_ply
from lightning_grendel.splatting.projection import RasterizeMode
from lightning_grendel.splatting.protocols import GaussianShardingStrategy, Renderer
from lightning_grendel.splatting.render import SingleProcessRenderer
from lightning_grendel.splatting.shard_reduce import gaussian_mean, gaussian_sum, sum_over_ranks
from lightning_grendel.splatting.sparse_adam import VisibleAdam
from lightning_grendel.splatting.trainer_flags import ClipAlgorithm, check_clip_arguments, refuse_unsupported_flags

RasterizerBackend = Literal["auto", "torch", "cpp", "gsplat"]


def cameras_from_batch(batch: dict[str, Tensor]) -> Cameras:
    """The batch's cameras; all its images share one size."""
    height, width = batch["image"].shape[1:3]
    ids = batch.get("index")
    ids = torch.as_tensor(ids) if ids is not None else None
    return Cameras(batch["world_to_camera"], batch["intrinsics"], int(width), int(height), ids)


class GaussianSplattingModule(LightningModule):
    """3D Gaussian Splatting with the reference (Inria) learning rates, schedules and densification.

    Args:
        sh_degree: highest SH degree; the active degree rises by one every ``sh_degree_interval`` images.
        sh_degree_interval: images seen between raising the active SH degree by one (starts at 0).
        ssim_weight: λ in ``(1-λ)·L1 + λ·(1-SSIM)``.
        total_images: images over which the position learning rate decays log-linearly
            from ``lr_means`` to ``lr_means_final`` (both multiplied by the scene extent).
        lr_means: initial Adam learning rate of the positions, in units of the scene extent.
        lr_means_final: position learning rate reached after ``total_images`` images (scene extent units).
        lr_scales: Adam learning rate of the log-scales.
        lr_quats: Adam learning rate of the rotation quaternions.
        lr_opacities: Adam learning rate of the opacity logits.
        lr_sh0: Adam learning rate of the base (degree-0) SH colour coefficients.
        lr_shN: Adam learning rate of the higher SH bands (degree 1 and up).
        adam_eps: Adam epsilon for one view per step; ``batch_scaling`` adjusts it for larger batches.
        batch_scaling: how Adam hyperparameters follow the number of views per step
            (``sqrt``: lr·√b, eps/√b, β^b; see :mod:`lightning_grendel.splatting.batching`).
        densify: density control: a ``DensifyConfig`` (Inria's clone/split/prune, the default; a plain
            mapping of its fields in a recipe) or an ``MCMCConfig`` (3DGS-MCMC: fixed budget ``cap_max``,
            relocation, noise, regularisers; in a recipe
            ``{class_path: lightning_grendel.splatting.mcmc.MCMCConfig, init_args: {...}}``
            or a mapping with its fields, e.g. ``{cap_max: 50000}``). Schedules count images seen.
            ``{absgrad: true}`` densifies on AbsGS's absolute view-space gradients.
        backend: rasterizer backend (``auto``, ``torch``, ``cpp``, ``gsplat``); ``auto`` picks ``cpp``
            (else ``torch``) on CPU and ``gsplat`` (else ``torch``) on CUDA.
        rasterize_mode: ``classic`` (3DGS: 0.3 px² dilation) or ``antialiased`` (the same dilation with
            Mip-Splatting's opacity compensation, gsplat's ``rasterize_mode``), in every backend.
        export_ply: write ``point_cloud.ply`` (all Gaussians) into the log directory at the end of fit.
        on_nonfinite: what a NaN or infinite loss, gradient or Gaussian does (checked on every rank after
            each step and densification, see :mod:`lightning_grendel.splatting.guards`): ``stop`` raises
            (non-zero exit, no checkpoint after the failure); ``skip`` drops the step or restores the rows.
        gradient_clip_val: clip the gradients before each step (None: no clipping); ``Trainer(gradient_clip_val)``
            does not apply to manual optimisation, this does.
        gradient_clip_algorithm: ``norm`` scales every gradient so that their global L2 norm, over every
            Gaussian of every rank's shard, is at most ``gradient_clip_val``; ``value`` clamps each element.
        init_ply: start from the Gaussians of this scene file (standard or compressed 3DGS PLY, SPZ or
            ``.splat``, e.g. another tool's output) instead of the data module's SfM points, to fine-tune or
            continue it. A file of a lower SH degree gets zero higher bands, a higher one is refused; the
            active SH degree starts at the file's. Read once when a run starts from scratch, never when a
            checkpoint is restored (its Gaussians win; the file may be gone). Under MCMC the file may
            hold at most ``cap_max`` Gaussians.
        coarse_to_fine: DashGaussian's schedule (a ``CoarseToFine``, or a mapping of its fields in a recipe,
            e.g. ``{full_resolution_images: 1000, growth_budget: 60000}``): train at a resolution chosen
            from the training images' spectrum that rises to full size by ``full_resolution_images``,
            with densification capped to grow with the rendered pixels up to ``growth_budget``
            (:mod:`~lightning_grendel.splatting.coarse_to_fine`). Evaluation is always at full size.
            None (the default): every step at full resolution. Not under a Gaussian-sharding strategy.
        sparse_adam: step only the Gaussians some view of the batch saw (radius > 0), each with its own
            step count for Adam's bias correction (:class:`~lightning_grendel.splatting.sparse_adam.VisibleAdam`);
            the same as the fused dense Adam when every Gaussian is visible. Not under a Gaussian-sharding
            strategy.
    """

    def __init__(
        self,
        sh_degree: int = 3,
        sh_degree_interval: int = 1000,
        ssim_weight: float = 0.2,
        total_images: int = 30_000,
        lr_means: float = 1.6e-4,
        lr_means_final: float = 1.6e-6,
        lr_scales: float = 5e-3,
        lr_quats: float = 1e-3,
        lr_opacities: float = 0.05,
        lr_sh0: float = 2.5e-3,
        lr_shN: float = 1.25e-4,  # noqa: N803 - gsplat's name for the higher SH bands
        adam_eps: float = 1e-15,
        batch_scaling: BatchScaling = "sqrt",
        densify: DensifyConfig | MCMCConfig | None = None,
        backend: RasterizerBackend = "auto",
        rasterize_mode: RasterizeMode = "classic",
        export_ply: bool = True,
        on_nonfinite: NonFiniteMode = "stop",
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: ClipAlgorithm = "norm",
        init_ply: str | None = None,
        coarse_to_fine: CoarseToFine | None = None,
        sparse_adam: bool = False,
    ) -> None:
        super().__init__()
        check_clip_arguments(gradient_clip_val, gradient_clip_algorithm, type(self).__name__)
        if isinstance(coarse_to_fine, dict):
            coarse_to_fine = CoarseToFine(**coarse_to_fine)
        if coarse_to_fine is not None and coarse_to_fine.growth_budget is not None and isinstance(densify, MCMCConfig):
            raise ValueError(f"{type(self).__name__}: coarse_to_fine.growth_budget schedules Inria densification; "
                             "MCMC has its own budget (densify.cap_max): leave growth_budget unset")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.renderer: Renderer = SingleProcessRenderer(backend, rasterize_mode)
        self.densifier = make_densifier(densify, sh_degree)
        self.guard = FiniteGuard(on_nonfinite, type(self).__name__)
        self.gaussians: nn.ParameterDict | None = None
        self.images_seen = 0
        self.initial_sh_degree = 0  # the SH degree of an init_ply file: the active degree starts there
        self.extent = 1.0
        self.register_buffer("background", torch.zeros(3), persistent=False)
        self._lpips: nn.Module | None = None
        self._lpips_checked = False
        self._fit_started = 0.0
        self.coarse_to_fine = coarse_to_fine
        self.resolution_schedule: ResolutionSchedule | None = None  # built from the images when training starts
        self.initial_count = 0  # Gaussians at the start of training: where the growth budget starts

    # --- model creation and checkpoints -------------------------------------------------------------

    def configure_model(self) -> None:
        """Gaussians from the data module's SfM points; with ``init_ply``, see :meth:`_create_gaussians_from_file`.

        Lightning calls this before it restores a checkpoint, so an ``init_ply`` file is read later, only
        when no checkpoint has supplied the Gaussians.
        """
        if self.gaussians is not None:
            return
        datamodule = self.trainer.datamodule
        for needed in ("train_cameras",) if self.hparams.init_ply else ("initial_points", "train_cameras"):
            if not hasattr(datamodule, needed):
                raise TypeError(
                    f"GaussianSplattingModule needs a datamodule with {needed}() (e.g. GaussianSplattingDataModule), "
                    f"got {type(datamodule).__name__}"
                )
        if not self.hparams.init_ply:
            points, colors = datamodule.initial_points()
            self._keep_shard(init_from_points(points, colors, self.hparams.sh_degree))  # scales from all points
        self.extent = scene_extent(datamodule.train_cameras())
        if not math.isfinite(self.extent):
            raise ValueError(f"GaussianSplattingModule: the scene extent is {self.extent}: a training camera of "
                             f"{type(datamodule).__name__} has a non-finite pose")
        if hasattr(datamodule, "background"):
            self.background = datamodule.background.to(self.device)

    def _keep_shard(self, raw: dict[str, Tensor]) -> None:
        """This rank's rows of the full initial Gaussians ``raw`` (all of them on one process) as parameters."""
        strategy = self.trainer.strategy
        if isinstance(strategy, GaussianShardingStrategy):
            rows = strategy.shard_indices(raw["means"].shape[0])
            raw = {key: value[rows] for key, value in raw.items()}
        self.gaussians = make_parameters({k: v.to(self.device) for k, v in raw.items()})

    def _create_gaussians_from_file(self) -> None:
        """The ``init_ply`` Gaussians, sharded as the SfM ones are, unless a checkpoint has restored Gaussians.

        Called where a run first needs them (``configure_optimizers``, the start of validate / test /
        predict): after Lightning restores a checkpoint, so a resumed run never reads the file.
        """
        if self.gaussians is not None or not self.hparams.init_ply:
            return
        name = type(self).__name__
        raw, self.initial_sh_degree = gaussians_from_file(self.hparams.init_ply, self.hparams.sh_degree, name)
        cap = getattr(getattr(self.densifier, "config", None), "cap_max", None)
        count = raw["means"].shape[0]
        if cap is not None and count > cap:
            raise ValueError(f"{name}(init_ply={self.hparams.init_ply!r}): the file holds {count} Gaussians, more "
                             f"than MCMC's budget cap_max={cap}; raise --model.densify.cap_max to at least {count}")
        self._keep_shard(raw)

    def check_trainer(self, trainer: Trainer) -> None:
        """Refuse Trainer flags this module cannot honour (see :mod:`~lightning_grendel.splatting.trainer_flags`).

        GrendelStrategy calls it in the launching process before any rank starts; on other strategies
        :meth:`configure_callbacks` does, the first module hook Lightning calls, before its own checks.
        """
        backend = getattr(trainer.strategy, "rasterizer_backend", None) or self.renderer.backend
        refuse_unsupported_flags(trainer, backend, type(self).__name__)
        if isinstance(trainer.strategy, GaussianShardingStrategy):
            for flag, value in (("coarse_to_fine", self.coarse_to_fine), ("sparse_adam", self.hparams.sparse_adam)):
                if value:
                    raise ValueError(f"{type(self).__name__}: --model.{flag} is not supported under "
                                     f"{type(trainer.strategy).__name__} (one process only); leave it unset")

    def configure_callbacks(self) -> list:
        """No callbacks: the first hook of every run, where the flags are checked and the fit clock starts."""
        self.check_trainer(self.trainer)
        self._fit_started = time.perf_counter()  # so the summary's time includes loading data and set-up
        return []

    def setup(self, stage: str) -> None:
        """On one process, checkpoint errors name the file (and say when it is a Grendel directory)."""
        strategy = self.trainer.strategy  # GrendelStrategy reads its directories itself, not through this
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = CheckedCheckpointIO()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["gaussian_splatting"] = {"images_seen": self.images_seen, "extent": self.extent,
                                            "initial_sh_degree": self.initial_sh_degree,
                                            "initial_count": self.initial_count}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resize the Gaussians to the checkpoint's count before Lightning loads the state dict."""
        state = checkpoint["state_dict"]
        raw = {key: state[f"gaussians.{key}"] for key in PARAM_KEYS}
        self.gaussians = make_parameters({k: v.to(self.device) for k, v in raw.items()})
        extra = checkpoint.get("gaussian_splatting", {})
        self.images_seen = int(extra.get("images_seen", 0))
        self.extent = float(extra.get("extent", self.extent))
        self.initial_sh_degree = int(extra.get("initial_sh_degree", 0))
        self.initial_count = int(extra.get("initial_count", 0))

    # --- scene-wide reductions ----------------------------------------------------------------------

    @property
    def gaussians_sharded(self) -> bool:
        """Whether each rank holds only a shard of the Gaussians (a sharding strategy on several ranks)."""
        trainer = self._trainer
        return (trainer is not None and trainer.world_size > 1
                and isinstance(trainer.strategy, GaussianShardingStrategy))

    def sum_over_ranks(self, share: Tensor) -> Tensor:
        """Every rank's ``share`` added up (the same on every rank; a collective when sharded), with the
        gradient of the scene-wide value on this rank's share; ``share`` itself on one process."""
        return sum_over_ranks(share, sharded=self.gaussians_sharded)

    def gaussian_sum(self, values: Tensor) -> Tensor:
        """Sum of a per-Gaussian tensor [N_local, ...] over every Gaussian of every rank (a collective when
        sharded); its gradient on each row is the single-process gradient of that row."""
        return gaussian_sum(values, sharded=self.gaussians_sharded)

    def gaussian_mean(self, values: Tensor) -> Tensor:
        """Mean of a per-Gaussian tensor [N_local, ...] over every element of every rank's shard (a collective
        when sharded). ``values.mean()`` would be this shard's mean: use this in regularisers."""
        return gaussian_mean(values, sharded=self.gaussians_sharded)

    # --- optimisation -------------------------------------------------------------------------------

    def _views_per_step(self) -> int:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        return int(getattr(datamodule, "batch_size", 1) or 1)

    def base_learning_rates(self) -> dict[str, float]:
        h = self.hparams
        return {
            "means": h.lr_means * self.extent,
            "scales": h.lr_scales,
            "quats": h.lr_quats,
            "opacities": h.lr_opacities,
            "sh0": h.lr_sh0,
            "shN": h.lr_shN,
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self._create_gaussians_from_file()
        if self.gaussians is None:
            raise RuntimeError("GaussianSplattingModule: Gaussians are created in configure_model(); it has not run")
        batch = self._views_per_step()
        lr_factor, betas, eps = scale_adam_hyperparameters(
            1.0, (0.9, 0.999), self.hparams.adam_eps, batch, self.hparams.batch_scaling
        )
        groups = [
            {"params": [self.gaussians[key]], "lr": lr * lr_factor, "name": key}
            for key, lr in self.base_learning_rates().items()
        ]
        if self.hparams.sparse_adam:
            return VisibleAdam(groups, betas=betas, eps=eps)
        # One fused pass per parameter instead of about eight elementwise ops: on 2 CPU cores the step
        # of 120k Gaussians at SH degree 3 is about 6x faster (benchmarks/optimizer.py, docs/results).
        fused = all(p.device.type in ("cpu", "cuda") for p in self.gaussians.values())
        return torch.optim.Adam(groups, betas=betas, eps=eps, fused=fused)

    def means_learning_rate(self, images: int) -> float:
        """Log-linear decay in images seen, times the batch scaling factor."""
        h = self.hparams
        t = min(max(images / max(h.total_images, 1), 0.0), 1.0)
        lr = math.exp((1 - t) * math.log(h.lr_means) + t * math.log(h.lr_means_final)) * self.extent
        lr_factor, _, _ = scale_adam_hyperparameters(1.0, (0.9, 0.999), 1.0, self._views_per_step(), h.batch_scaling)
        return lr * lr_factor

    @property
    def active_sh_degree(self) -> int:
        raised = self.images_seen // max(self.hparams.sh_degree_interval, 1)
        return min(self.hparams.sh_degree, max(self.initial_sh_degree, raised))

    # --- training ----------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        """The resolution schedule from the training images' spectrum; the count the growth budget starts at."""
        if self.coarse_to_fine is None:
            return
        if self.initial_count == 0:  # a resumed run keeps its checkpoint's
            self.initial_count = self.gaussians["means"].shape[0]
        dataset = self.trainer.datamodule.train_dataloader().dataset
        views = min(self.coarse_to_fine.spectrum_views, len(dataset))
        # A streamed split's items carry no image (the batch reads rows on demand): ask the dataset for pixels.
        image = dataset.pixels if hasattr(dataset, "pixels") else (lambda index: dataset[index]["image"])
        picked = [image(i * len(dataset) // views) for i in range(views)]
        energy = band_energy(torch.stack(picked), self.coarse_to_fine.max_factor)
        self.resolution_schedule = ResolutionSchedule(energy, self.coarse_to_fine)
        rank_zero_info(f"{type(self).__name__}: coarse to fine from 1/{self.resolution_schedule.start_factor} "
                       f"resolution to full at {self.coarse_to_fine.full_resolution_images} images")

    def _scheduled_batch(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], int]:
        """The batch at this step's resolution, and the factor; sets the densifier's growth limit."""
        schedule = self.resolution_schedule
        if schedule is None:
            return batch, 1
        factor = schedule.factor(self.images_seen)
        height, width = batch["image"].shape[1:3]
        self.densifier.growth_limit = schedule.growth_limit(self.initial_count, factor, height, width)
        return downsampled_batch(batch, factor), factor

    def render_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Any]:
        """The photometric loss summed over the batch's views, scene-wide (the same on every rank), and the
        render. Each rank computes the loss of the rows it rendered; :meth:`sum_over_ranks` adds them up."""
        cameras = cameras_from_batch(batch)
        targets = batch["image"]
        halo = SSIM_HALO if self.hparams.ssim_weight > 0 else 0
        result = self.renderer(self.gaussians, cameras, self.active_sh_degree, self.background, halo=halo,
                               absgrad=self.densifier.uses_absgrad)
        full_pixels = cameras.width * cameras.height * targets.shape[-1]
        loss = targets.new_zeros(())
        for view in result.views:
            target = targets[view.view, view.row_start : view.row_end]
            loss = loss + strip_loss(
                view.image, target, view.own_start - view.row_start, view.own_end - view.row_start,
                full_pixels, self.hparams.ssim_weight,
            )
        return self.sum_over_ranks(loss), result

    def regularization(self) -> Tensor:
        """Per-image regulariser over the Gaussians, scene-wide: MCMC's opacity and scale terms (else zero).

        Added to every view's loss. Override it to add terms, written with :meth:`gaussian_mean` or
        :meth:`gaussian_sum` (never a plain ``.mean()`` over ``self.gaussians``: see the module docstring).
        """
        terms = getattr(self.densifier, "regularization", None)
        if terms is None:
            return self.gaussians["means"].new_zeros(())
        return terms(self.gaussians, self.gaussian_mean)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        views = batch["image"].shape[0]
        for group in optimizer.param_groups:
            if group.get("name") == "means":
                group["lr"] = self.means_learning_rate(self.images_seen)
        optimizer.zero_grad(set_to_none=True)
        batch, factor = self._scheduled_batch(batch)
        photometric, result = self.render_loss(batch)
        regularization = self.regularization()
        loss = photometric + views * regularization
        self.manual_backward(loss)
        step, inner = self.global_step + 1, optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        for param in self.gaussians.values():
            if param.grad is not None:
                param.grad /= views
        if not self.guard.before_step(loss, self.gaussians, inner, step, self.images_seen):  # skipped on every rank
            return loss.detach()
        if self.hparams.gradient_clip_val is not None:
            self.clip_gradients(inner, self.hparams.gradient_clip_val, self.hparams.gradient_clip_algorithm)
        view_grad = result.means2d.grad if result.absgrad is None else result.absgrad.grad  # AbsGS: |.| per pixel
        if view_grad is not None:
            self.densifier.accumulate(view_grad, result.radii, result.width, result.height)
        if isinstance(inner, VisibleAdam):
            inner.set_visible((result.radii > 0).any(dim=0))
        optimizer.step()
        self.guard.after_step(self.gaussians, inner, step, self.images_seen)

        before, self.images_seen = self.images_seen, self.images_seen + views
        self._density_control(inner, before, step)
        # Scene-wide already (render_loss and regularization add the ranks' shares up): no sync_dist.
        self.log("train/loss", loss.detach() / views, prog_bar=True)
        self.log("train/photometric", photometric.detach() / views)
        self.log("train/regularization", regularization.detach())
        self.log("train/gaussians", float(self.global_gaussian_count()), prog_bar=True)
        self.log("train/sh_degree", float(self.active_sh_degree))
        if self.resolution_schedule is not None:
            self.log("train/resolution_factor", float(factor))
        for name, value in self.renderer.last_stats.items():  # exchange volume, balance
            self.log(f"renderer/{name}", value, sync_dist=True, reduce_fx="max" if "imbalance" in name else "sum")
        return loss

    def _density_control(self, optimizer: torch.optim.Optimizer, images_before: int, step: int) -> None:
        densifier, now = self.densifier, self.images_seen
        changed = densifier.step(self.gaussians, optimizer, images_before, now, self.extent)
        if changed:
            self.guard.after_densify(self.gaussians, optimizer, step, now)
            strategy = self.trainer.strategy
            if isinstance(strategy, GaussianShardingStrategy):
                strategy.after_density_change(self.gaussians, optimizer)
                densifier.reset_statistics(self.gaussians["means"].shape[0], self.device)

    def clip_gradients(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's ``clip_gradients``, with the norm over every rank's shard when the Gaussians are sharded.

        Clipping by value is elementwise, so each rank clamps its own rows. Clipping by norm needs the
        norm of the whole gradient: the ranks add their squared norms up before scaling.
        """
        if gradient_clip_val is None or (gradient_clip_algorithm or "norm") != "norm" or not self.gaussians_sharded:
            super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        gaussians = {id(p) for p in self.gaussians.values()}
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        replicated = [p for p in params if id(p) not in gaussians]
        if replicated:
            raise ValueError(f"{type(self).__name__}.clip_gradients: the global norm over shards covers the Gaussians "
                             f"only; the optimiser also holds {len(replicated)} replicated parameter(s)")
        squares = self.gaussians["means"].new_zeros((), dtype=torch.float64)
        for param in params:
            squares = squares + param.grad.detach().to(torch.float64).pow(2).sum()
        norm = self.sum_over_ranks(squares).sqrt()
        scale = (gradient_clip_val / (norm + 1e-6)).clamp(max=1.0)  # torch.nn.utils.clip_grad_norm_'s rule
        for param in params:
            param.grad.mul_(scale.to(param.grad.dtype))

    def global_gaussian_count(self) -> int:
        local = self.gaussians["means"].shape[0]
        if self.trainer.world_size == 1:
            return local
        total = self.trainer.strategy.reduce(torch.tensor(float(local), device=self.device), reduce_op="sum")
        return int(total.item())

    # --- evaluation --------------------------------------------------------------------------------

    def render_views(self, cameras: Cameras) -> Tensor:
        """Full images [C, H, W, 3] of ``cameras`` on every rank (a collective under Grendel)."""
        with torch.no_grad():
            return self.renderer.render_full(self.gaussians, cameras, self.active_sh_degree, self.background)

    def _evaluate(self, batch: dict[str, Tensor], batch_idx: int, stage: str) -> dict[str, Tensor]:
        cameras = cameras_from_batch(batch)
        renders = self.render_views(cameras)
        metrics: dict[str, list[Tensor]] = {"psnr": [], "ssim": [], "lpips": []}
        for render, target in zip(renders, batch["image"], strict=True):
            metrics["psnr"].append(psnr(render, target))
            metrics["ssim"].append(ssim(render, target))
            if self._lpips is not None:
                metrics["lpips"].append(lpips(self._lpips, render, target))
        values = {name: torch.stack(items).mean() for name, items in metrics.items() if items}
        for name, value in values.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "psnr", sync_dist=True, batch_size=len(cameras))
        if batch_idx == 0:
            self._log_image_grid(f"{stage}/gt_render_error", renders[0], batch["image"][0])
        return values

    def _ensure_lpips(self) -> None:
        if not self._lpips_checked:
            self._lpips_checked = True
            self._lpips = make_lpips()

    def on_validation_start(self) -> None:
        self._create_gaussians_from_file()
        self._ensure_lpips()

    def on_test_start(self) -> None:
        self._create_gaussians_from_file()
        self._ensure_lpips()

    def on_predict_start(self) -> None:
        self._create_gaussians_from_file()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, batch_idx, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.render_views(cameras_from_batch(batch)).clamp(0, 1)

    def _log_image_grid(self, tag: str, render: Tensor, target: Tensor) -> None:
        if not self.trainer.is_global_zero or not isinstance(self.logger, TensorBoardLogger):
            return
        error = (render.clamp(0, 1) - target).abs().mean(-1, keepdim=True).expand_as(target)
        grid = torch.cat([target, render.clamp(0, 1), error.clamp(0, 1)], dim=1).permute(2, 0, 1)
        experiment = self.logger.experiment
        experiment.add_image(tag, grid.float().cpu(), self.global_step)
        experiment.add_histogram("gaussians/opacity_rank0", torch.sigmoid(self.gaussians["opacities"]).detach().cpu(),
                                 self.global_step)

    # --- export -----------------------------------------------------------------------------------

    def gathered_gaussians(self) -> dict[str, Tensor] | None:
        """Every Gaussian on rank 0 (None elsewhere); on one process, this process's Gaussians."""
        strategy = self.trainer.strategy
        if isinstance(strategy, GaussianShardingStrategy):
            return strategy.gather_gaussians(self.gaussians)
        return {key: value.detach().cpu() for key, value in self.gaussians.items()}

    def on_fit_end(self) -> None:
        """Export the PLY (all Gaussians, gathered on rank 0) and print the run's summary once."""
        trainer = self.trainer
        log_dir = trainer.log_dir  # a collective under multi-process strategies: every rank asks
        count = self.global_gaussian_count()  # a collective too
        ply = None
        if self.hparams.export_ply:
            params = self.gathered_gaussians()
            if params is not None and trainer.is_global_zero and log_dir is not None:
                ply = Path(log_dir) / "point_cloud.ply"
                save_ply(ply, params)
        if trainer.is_global_zero:
            psnr_value = trainer.callback_metrics.get("val/psnr")
            checkpoint = trainer.checkpoint_callback
            rank_zero_info(fit_summary(
                type(self).__name__, count, trainer.world_size, time.perf_counter() - self._fit_started,
                trainer.global_step, self.images_seen, None if psnr_value is None else float(psnr_value),
                log_dir, getattr(checkpoint, "last_model_path", "") or getattr(checkpoint, "best_model_path", ""),
                ply,
            ))

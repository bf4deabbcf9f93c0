"""GrendelStrategy: distributed 3D Gaussian Splatting training as a Lightning strategy.

Each rank owns a disjoint shard of the Gaussians and their Adam state; images are split into pixel
partitions; a sparse all-to-all moves only the splats each partition needs (see ``renderer.py``).
It is a ``ParallelStrategy``, not a ``DDPStrategy``: DDP insists on equal parameter shapes on every
rank, and densification changes them. Gaussians get no gradient all-reduce; any other (replicated)
parameters of the module do.

Call order: ``launch`` (after the module's ``check_trainer``, so a refused Trainer flag fails in the
launching process before any rank starts), ``setup_environment`` (process group), ``setup`` (renderer,
optimisers; Lightning's distributed sampler is turned off: every rank reads every batch), the training
steps (``optimizer_step`` averages replicated gradients; the module calls ``after_density_change``),
``save_checkpoint`` / ``load_checkpoint`` (sharded directories), ``gather_gaussians`` at export.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from lightning_grendel._process_group import ProcessGroupStrategy, StartMethod
from lightning_grendel.splatting.grendel.balancer import BalanceMode, LoadBalancer
from lightning_grendel.splatting.grendel.checkpoint import (
    CheckpointIntegrityError,
    load_file,
    load_sharded,
    reshard,
    save_sharded,
)
from lightning_grendel.splatting.grendel.launchers import CheckedScriptLauncher, CheckedSpawnLauncher
from lightning_grendel.splatting.grendel.redistribute import even_shares, redistribute
from lightning_grendel.splatting.grendel.renderer import GrendelRenderer
from lightning_grendel.splatting.protocols import Renderer

log = logging.getLogger(__name__)


class GrendelStrategy(ProcessGroupStrategy):
    """Distributed 3DGS (Grendel): sharded Gaussians, pixel partitions, sparse all-to-all, load balancing.

    It is a :class:`~lightning_grendel.splatting.protocols.GaussianShardingStrategy` and replaces the
    module's ``renderer`` (a :class:`~lightning_grendel.splatting.protocols.Renderer`) in ``setup``.

    Args:
        process_group_backend: ``gloo`` or ``nccl``; by default the one that suits the device.
        timeout_s: seconds a collective may wait before failing (a dead rank becomes an error, not a hang).
        start_method: ``popen`` (re-runs the script; for the CLI), ``spawn`` or ``fork``.
        load_balancing: ``pairs`` (splat-tile pairs, deterministic), ``time`` (measured) or ``off``.
        redistribute_threshold: even out shard sizes after densification when the largest exceeds the
            smallest by more than this fraction; ``None`` disables it.
        rasterizer_backend: overrides the module's rasterizer backend when given.
    """

    strategy_name = "grendel"
    script_launcher = CheckedScriptLauncher  # the module's check_trainer runs before any rank starts
    spawn_launcher = CheckedSpawnLauncher

    def __init__(
        self,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout_s: float = 1800.0,
        start_method: StartMethod = "popen",
        load_balancing: BalanceMode = "pairs",
        redistribute_threshold: float | None = 0.1,
        rasterizer_backend: str | None = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout_s=timeout_s,
            start_method=start_method,
        )
        self.balancer = LoadBalancer(load_balancing)
        self.redistribute_threshold = redistribute_threshold
        self.rasterizer_backend = rasterizer_backend
        self.renderer: GrendelRenderer | None = None

    # --- model set-up ------------------------------------------------------------------------------

    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        self.keep_loader_order(trainer)
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        module = self.lightning_module
        own = getattr(module, "renderer", None)
        if not isinstance(own, Renderer):
            raise TypeError(f"GrendelStrategy needs a module whose `renderer` attribute is a Renderer "
                            f"(see lightning_grendel.splatting.protocols); {type(module).__name__} has {own!r}")
        self.renderer = GrendelRenderer(self.balancer, backend=self.rasterizer_backend or own.backend,
                                        rasterize_mode=getattr(own, "rasterize_mode", "classic"))
        module.renderer = self.renderer
        set_shard = getattr(getattr(module, "densifier", None), "set_shard", None)
        if set_shard is not None:  # a budgeted densifier (MCMC): this rank holds its share of the budget
            set_shard(self.global_rank, self.world_size)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def shard_indices(self, count: int) -> slice:
        """Rows of the initial points this rank owns: an even contiguous split."""
        shares = even_shares(count, self.world_size)
        start = sum(shares[: self.global_rank])
        return slice(start, start + shares[self.global_rank])

    def _gaussian_parameters(self) -> set[int]:
        gaussians = getattr(self.lightning_module, "gaussians", None)
        return {id(p) for p in gaussians.values()} if isinstance(gaussians, nn.ParameterDict) else set()

    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        """All-reduce (average) gradients of replicated parameters; Gaussian shards keep their own."""
        sharded = self._gaussian_parameters()
        inner = getattr(optimizer, "optimizer", optimizer)
        for group in inner.param_groups:
            for param in group["params"]:
                if id(param) not in sharded and param.grad is not None:
                    dist.all_reduce(param.grad)
                    param.grad /= self.world_size
        return super().optimizer_step(optimizer, closure, model, **kwargs)

    # --- hooks the Gaussian module calls ------------------------------------------------------------

    def after_density_change(self, params: nn.ParameterDict, optimizer: torch.optim.Optimizer) -> None:
        """Even out shard sizes after densification when they drifted apart."""
        if self.redistribute_threshold is not None and redistribute(params, optimizer, self.redistribute_threshold):
            log.info("rank %d: redistributed Gaussians, now %d here", self.global_rank, params["means"].shape[0])

    def gather_gaussians(self, params: nn.ParameterDict) -> dict[str, Tensor] | None:
        """Every rank's Gaussians, concatenated in rank order on rank 0 (None on other ranks)."""
        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(counts, torch.tensor([params["means"].shape[0]]))
        largest = int(max(counts))
        result: dict[str, Tensor] = {}
        for key, value in params.items():
            padded = value.detach().new_zeros((largest, *value.shape[1:]))
            padded[: value.shape[0]] = value.detach()
            gathered = [torch.zeros_like(padded) for _ in range(self.world_size)]
            dist.all_gather(gathered, padded)
            result[key] = torch.cat([g[: int(c)] for g, c in zip(gathered, counts, strict=True)]).cpu()
        return result if self.global_rank == 0 else None

    # --- sharded checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """All or nothing (see ``checkpoint.py``): a rank that dies mid-save fails it on every rank."""
        checkpoint = {**checkpoint, "grendel": {"balancer": self.balancer.state_dict()}}
        save_sharded(checkpoint, Path(filepath), self.global_rank, self.world_size)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Every rank checks the files it reads; one rank's failure is raised on all of them (no hang)."""
        path = Path(checkpoint_path)
        checkpoint, error = None, None
        try:
            if path.is_file():  # a single-process checkpoint: every rank reads it, then keeps its share
                single = load_file(path)
                checkpoint = {**single, **reshard([single], self.global_rank, self.world_size)}
            else:
                checkpoint = load_sharded(path, self.global_rank, self.world_size)
        except (OSError, CheckpointIntegrityError, KeyError) as failure:
            error = f"{type(failure).__name__}: {failure}"
        errors = [error]
        if dist.is_initialized() and self.world_size > 1:
            errors = [None] * self.world_size
            dist.all_gather_object(errors, error)
        failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
        if failed:
            rank, message = failed[0]
            raise CheckpointIntegrityError(f"cannot resume from {path} (rank {rank}): {message}")
        self.balancer.load_state_dict(checkpoint.get("grendel", {}).get("balancer", {}))
        return checkpoint

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.global_rank == 0:
            shutil.rmtree(filepath, ignore_errors=True)

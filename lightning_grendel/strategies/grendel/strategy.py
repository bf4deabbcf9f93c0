"""GrendelStrategy: distributed 3D Gaussian Splatting training as a Lightning strategy.

Each rank owns a disjoint shard of the Gaussians and their Adam state; images are split into pixel
partitions; a sparse all-to-all moves only the splats each partition needs (see ``renderer.py``).
It subclasses ``ParallelStrategy``, not ``DDPStrategy``: DDP insists on equal parameter shapes on every
rank, and densification changes them. Gaussians get no gradient all-reduce; any other (replicated)
parameters of the module do.
"""

from __future__ import annotations

import logging
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn

from lightning_grendel.strategies.grendel.balancer import BalanceMode, LoadBalancer
from lightning_grendel.strategies.grendel.checkpoint import load_sharded, reshard, save_sharded
from lightning_grendel.strategies.grendel.redistribute import even_shares, redistribute
from lightning_grendel.strategies.grendel.renderer import GrendelRenderer

log = logging.getLogger(__name__)


class GrendelStrategy(ParallelStrategy):
    """Distributed 3DGS (Grendel): sharded Gaussians, pixel partitions, sparse all-to-all, load balancing.

    Args:
        process_group_backend: ``gloo`` or ``nccl``; by default the one that suits the device.
        timeout_s: seconds a collective may wait before failing (a dead rank becomes an error, not a hang).
        start_method: ``popen`` (re-runs the script; for the CLI), ``spawn`` or ``fork``.
        load_balancing: ``pairs`` (splat-tile intersections, deterministic), ``time`` (measured) or ``off``.
        redistribute_threshold: even out shard sizes after densification when the largest exceeds the
            smallest by more than this fraction; ``None`` disables it.
        rasterizer_backend: overrides the module's rasterizer backend when given.
    """

    strategy_name = "grendel"

    def __init__(
        self,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout_s: float = 1800.0,
        start_method: Literal["popen", "spawn", "fork"] = "popen",
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
        )
        self._num_nodes = 1
        self._process_group_backend = process_group_backend
        self._timeout = timedelta(seconds=timeout_s)
        self._start_method = start_method
        self.balancer = LoadBalancer(load_balancing)
        self.redistribute_threshold = redistribute_threshold
        self.rasterizer_backend = rasterizer_backend
        self.renderer: GrendelRenderer | None = None

    # --- ranks, devices and the process group --------------------------------------------------------

    @property
    def is_distributed(self) -> bool:
        return True

    @property
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Every rank renders (a part of) every view of the batch: all ranks read the same samples.
        return {"num_replicas": 1, "rank": 0}

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = _MultiProcessingLauncher(self, start_method=self._start_method)

    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()
        self.set_world_ranks()
        self._process_group_backend = self._process_group_backend or _get_default_process_group_backend_for_device(
            self.root_device
        )
        assert self.cluster_environment is not None
        kwargs: dict[str, Any] = {"timeout": self._timeout}
        if self.root_device.type != "cpu":
            kwargs["device_id"] = self.root_device
        _init_dist_connection(self.cluster_environment, self._process_group_backend, **kwargs)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank

    # --- model set-up ------------------------------------------------------------------------------

    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        module = self.lightning_module
        backend = self.rasterizer_backend or getattr(getattr(module, "renderer", None), "backend", "auto")
        self.renderer = GrendelRenderer(self.balancer, backend=backend)
        if hasattr(module, "renderer"):
            module.renderer = self.renderer
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

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

    # --- collectives Lightning needs ----------------------------------------------------------------

    def barrier(self, name: str | None = None) -> None:
        if _distributed_is_initialized():
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src)
        return holder[0]

    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    # --- sharded checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        checkpoint = {**checkpoint, "grendel": {"balancer": self.balancer.state_dict()}}
        save_sharded(checkpoint, Path(filepath), self.global_rank, self.world_size)
        self.barrier()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(checkpoint_path)
        if path.is_file():  # a single-process checkpoint: every rank reads it, then keeps its share
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            return {**checkpoint, **reshard([checkpoint], self.global_rank, self.world_size)}
        checkpoint = load_sharded(path, self.global_rank, self.world_size)
        self.balancer.load_state_dict(checkpoint.get("grendel", {}).get("balancer", {}))
        return checkpoint

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.global_rank == 0:
            shutil.rmtree(filepath, ignore_errors=True)

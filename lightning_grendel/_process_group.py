"""ProcessGroupStrategy: the multi-process plumbing both of this package's strategies share.

One process per device, a ``torch.distributed`` process group with a timeout (so a dead rank becomes
an error, not a hang), Lightning's launchers, and samplers that give every rank the same samples: in
Grendel every rank renders a strip of every view, and in a pipeline every stage needs the batch.
Nothing here wraps the model: the subclasses decide how parameters are synchronised.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.distributed import (
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor

StartMethod = Literal["popen", "spawn", "fork", "forkserver"]


def init_backend(backend: str) -> str:
    """The backend string the process group is made with: plain NCCL gets gloo beside it for CPU tensors.

    Some small collectives carry CPU tensors (render counts, balancer timings, Gaussian counts), and an
    NCCL-only group refuses those; ``"cpu:gloo,cuda:nccl"`` routes each tensor by its device.
    """
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else backend


def leave_process_group() -> None:
    """Wait for every rank, then destroy the default process group.

    Ranks that simply exit tear gloo down during interpreter shutdown while their peers may still be
    connected, which now and then ends a finished run in SIGABRT. Call this only after a run succeeded:
    after a failure the barrier would wait for ranks that are gone.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class _LeaveTogetherLauncher(_MultiProcessingLauncher):
    """Lightning's spawn/fork launcher whose workers leave the process group together once they are done."""

    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        super()._wrapping_function(*args, **kwargs)
        leave_process_group()


class ProcessGroupStrategy(ParallelStrategy):
    """A ``ParallelStrategy`` that owns the process group but leaves parameter synchronisation to subclasses."""

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
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        if start_method not in ("popen", "spawn", "fork", "forkserver"):
            raise ValueError(f"unknown start_method {start_method!r}; choose popen, spawn, fork or forkserver")
        self._num_nodes = 1
        self._process_group_backend = process_group_backend
        self._timeout = timedelta(seconds=timeout_s)
        self._start_method = start_method

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
        return {"num_replicas": 1, "rank": 0}  # every rank reads the same, identically shuffled samples

    @property
    def is_distributed(self) -> bool:
        """True: Lightning then honours ``self.log(..., sync_dist=True)`` (it drops ``sync_dist`` otherwise)."""
        return True

    @staticmethod
    def keep_loader_order(trainer: Any) -> None:
        """Call in ``setup``: every rank iterates the loaders as written, in the single-process order.

        ``is_distributed`` would make Lightning wrap the loaders in a ``DistributedSampler``,
        reshuffled by its own seed; every rank needs the same batches in the loader's own order.
        """
        trainer._accelerator_connector.use_distributed_sampler = False

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

    # Launcher classes for popen and for spawn/fork/forkserver; a subclass may name subclasses of these.
    script_launcher: type[_SubprocessScriptLauncher] = _SubprocessScriptLauncher
    spawn_launcher: type[_MultiProcessingLauncher] = _LeaveTogetherLauncher

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            self._launcher = self.script_launcher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = self.spawn_launcher(self, start_method=self._start_method)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank

    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()
        self.set_world_ranks()
        self._process_group_backend = self._process_group_backend or _get_default_process_group_backend_for_device(
            self.root_device
        )
        kwargs: dict[str, Any] = {"timeout": self._timeout}
        if self.root_device.type != "cpu":
            kwargs["device_id"] = self.root_device
        _init_dist_connection(self.cluster_environment, init_backend(self._process_group_backend), **kwargs)

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if dist.is_initialized():
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not dist.is_initialized():
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src)
        return holder[0]

    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op) if isinstance(tensor, Tensor) else tensor

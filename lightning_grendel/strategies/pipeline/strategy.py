"""``PipelineStrategy``: Lightning runs the step, the strategy runs it as a pipeline over stage meshes.

Lightning has no pipeline parallelism since 2.0; DTensor cannot move a tensor between meshes. This
strategy uses the package's cross-mesh resharding for every activation and gradient between stages.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.distributed import _init_dist_connection, _sync_ddp_if_available
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor

from lightning_grendel.strategies.pipeline.mesh import Mesh, check_disjoint
from lightning_grendel.strategies.pipeline.plan import EXECUTORS
from lightning_grendel.strategies.pipeline.runtime import PipelineRuntime
from lightning_grendel.strategies.pipeline.schedules import check_schedule
from lightning_grendel.strategies.pipeline.senders import check_mode
from lightning_grendel.strategies.pipeline.stages import get_pipeline


class PipelineStrategy(ParallelStrategy):
    """Pipeline parallelism over stage meshes with cross-mesh resharding (GPipe, 1F1B, eager 1F1B).

    ``stage_meshes`` lists the global ranks of each stage (default: one rank per stage) and
    ``mesh_shapes`` their shapes (default ``(1, n)``). The LightningModule defines
    ``pipeline_stages(self) -> Pipeline``; its ``training_step`` is replaced by the pipelined step,
    which logs ``train_loss``. Every rank sees the same batches (the first stage reads the inputs,
    the last the targets).
    """

    strategy_name = "pipeline"
    is_distributed = True

    def __init__(self, stage_meshes: list[list[int]] | None = None, mesh_shapes: list[list[int]] | None = None,
                 schedule: str = "eager_1f1b", resharding: str = "broadcast", sender_selection: str = "normal",
                 num_microbatches: int = 4, transfer_latency_s: float = 0.0, start_method: str = "popen",
                 timeout_s: float = 120.0, accelerator: Any = None,
                 parallel_devices: list[torch.device] | None = None,
                 cluster_environment: ClusterEnvironment | None = None, checkpoint_io: CheckpointIO | None = None,
                 precision_plugin: Precision | None = None) -> None:
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin)
        check_schedule(schedule)
        check_mode(sender_selection)
        if resharding not in EXECUTORS:
            raise ValueError(f"unknown resharding executor {resharding!r}; choose one of {EXECUTORS}")
        if start_method not in ("popen", "spawn", "fork", "forkserver"):
            raise ValueError(f"unknown start_method {start_method!r}")
        if mesh_shapes is not None and (stage_meshes is None or len(mesh_shapes) != len(stage_meshes)):
            raise ValueError("mesh_shapes needs stage_meshes with one shape per stage")
        self._meshes = self._build_meshes(stage_meshes, mesh_shapes) if stage_meshes is not None else None
        self.schedule, self.resharding, self.sender_selection = schedule, resharding, sender_selection
        self.num_microbatches, self.transfer_latency_s = num_microbatches, transfer_latency_s
        self._start_method, self._timeout_s = start_method, timeout_s
        self._num_nodes = 1
        self._runtime: PipelineRuntime | None = None
        self._pending_grads: list[tuple[Tensor, Tensor | None]] = []

    @staticmethod
    def _build_meshes(stage_meshes: list[list[int]], mesh_shapes: list[list[int]] | None) -> list[Mesh]:
        meshes = [Mesh(ranks, None if mesh_shapes is None else mesh_shapes[i]) for i, ranks in enumerate(stage_meshes)]
        check_disjoint(meshes)
        return meshes

    @property
    def meshes(self) -> list[Mesh]:
        """Stage meshes; without ``stage_meshes`` every process is a stage of its own."""
        return self._meshes or [Mesh([r], (1, 1)) for r in range(self.world_size)]

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
        """Every stage needs the same batch: the first stage its inputs, the last its targets."""
        return {"num_replicas": 1, "rank": 0}

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = _MultiProcessingLauncher(self, start_method=self._start_method)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank

    def setup_environment(self) -> None:
        super().setup_environment()
        self.set_world_ranks()
        backend = "nccl" if self.root_device.type == "cuda" else "gloo"
        _init_dist_connection(self.cluster_environment, backend, timeout=timedelta(seconds=self._timeout_s))

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        module = self.lightning_module
        if not module.automatic_optimization:
            raise ValueError("PipelineStrategy runs forward and backward itself: use automatic optimisation")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError("PipelineStrategy accumulates over micro-batches; set accumulate_grad_batches=1")
        meshes = self.meshes
        self._runtime = PipelineRuntime(get_pipeline(module, len(meshes)), meshes, schedule=self.schedule,
                                        executor=self.resharding, sender_mode=self.sender_selection,
                                        num_microbatches=self.num_microbatches,
                                        transfer_latency_s=self.transfer_latency_s, timeout_s=self._timeout_s)

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    def training_step(self, batch: Any, batch_idx: int = 0, *args: Any, **kwargs: Any) -> Tensor:
        assert self._runtime is not None
        params = list(self._runtime.module.parameters())
        for p in params:
            p.grad = None
        loss = self._runtime.step(batch[0], batch[1])
        # Lightning zeroes gradients between training_step and backward: keep ours aside until then.
        self._pending_grads = [(p, p.grad) for p in params]
        for p in params:
            p.grad = None
        self.lightning_module.log("train_loss", loss, prog_bar=True)
        return loss

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        """The pipelined step already ran every backward: hand its gradients to the optimiser step."""
        for p, grad in self._pending_grads:
            p.grad = grad
        self._pending_grads = []
        return closure_loss

    def sync_parameters(self) -> None:
        """Give every rank every stage's current parameters (for validation, checkpoints, rank 0's copy)."""
        if self._runtime is not None:
            self._runtime.sync_parameters()

    def on_validation_start(self) -> None:
        self.sync_parameters()

    def on_train_end(self) -> None:
        self.sync_parameters()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        self.sync_parameters()
        return super().lightning_module_state_dict()

    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op) if isinstance(tensor, Tensor) else tensor

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if dist.is_initialized():
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not dist.is_initialized():
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src)
        return holder[0]

    def teardown(self) -> None:
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None
        super().teardown()

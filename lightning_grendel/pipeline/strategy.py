"""``PipelineStrategy``: Lightning runs the step, the strategy runs it as a pipeline over stage meshes.

Lightning has no pipeline parallelism since 2.0; DTensor cannot move a tensor between meshes. This
strategy uses the package's cross-mesh resharding for every activation and gradient between stages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor, nn

from lightning_grendel._process_group import ProcessGroupStrategy, StartMethod
from lightning_grendel.pipeline.checkpoint import (
    gather_optimizer_state,
    local_indices,
    optimizer_parameters,
    restrict_state,
    state_owners,
)
from lightning_grendel.pipeline.clipping import counted_parameters
from lightning_grendel.pipeline.flags import check_trainer
from lightning_grendel.pipeline.precision import clip_over_pipeline
from lightning_grendel.pipeline.runtime import PipelineRuntime
from lightning_grendel.pipeline.schedules import Schedule, check_schedule
from lightning_grendel.pipeline.stages import get_pipeline
from lightning_grendel.resharding.mesh import Mesh, check_disjoint
from lightning_grendel.resharding.plan import Executor, check_executor
from lightning_grendel.resharding.senders import SenderMode, check_sender_mode
from lightning_grendel.resharding.shm import Transport, check_transport


class PipelineStrategy(ProcessGroupStrategy):
    """Pipeline parallelism over stage meshes with cross-mesh resharding (any schedule of ``SCHEDULES``).

    ``stage_meshes`` lists the global ranks of each stage (default: one rank per stage) and
    ``mesh_shapes`` their shapes (default ``(1, n)``). The LightningModule defines
    ``pipeline_stages(self) -> Pipeline`` (``virtual_stages`` chunks per stage mesh);
    its ``training_step`` is replaced by the pipelined step,
    which logs ``train/loss``. Every rank sees the same batches (the first stage reads the inputs,
    the last the targets). A checkpoint is one ordinary Lightning file: full parameters, and every
    stage's optimizer state merged by parameter; on resume each rank takes back its stage's part.
    ``transport`` (``auto``, ``dist``, ``shm``) is how activations and gradients move, as in ``reshard()``.
    Trainer flags run as in a plain run or are refused in ``setup_environment`` (``flags.py``;
    docs/pipeline_conformance.md): the precision plugin's forward context wraps every stage forward,
    norm clipping uses the norm over all stages, ``accumulate_grad_batches`` sums over the window.

    Args:
        stage_meshes: global ranks of each stage mesh.
        mesh_shapes: shape of each stage mesh.
        schedule: ``gpipe``, ``1f1b``, ``eager_1f1b``, ``interleaved_1f1b`` or ``eager_interleaved_1f1b``
            (both need ``num_microbatches`` a multiple of the number of stage meshes), or ``zb_h1`` (zero
            bubble: backward split into input- and weight-gradient passes, weight passes in the bubbles).
        virtual_stages: model chunks per stage mesh (``v``); chunk ``c`` runs on mesh ``c mod S``, so
            ``pipeline_stages()`` returns ``v * S`` stages. Above 1 only with the interleaved schedules.
        executor: resharding executor (``send_recv``, ``allgather``, ``broadcast``).
        sender_mode: sender selection of the resharding plans.
        num_microbatches: micro-batches per step.
        transfer_latency_s: emulated delay before every transfer (benchmarks).
        start_method: how the processes are started.
        timeout_s: process-group timeout.
        transport: ``auto``, ``dist`` or ``shm``.
        accelerator: Lightning accelerator.
        parallel_devices: Lightning devices.
        cluster_environment: Lightning cluster environment.
        checkpoint_io: Lightning checkpoint IO.
        precision_plugin: Lightning precision plugin.
    """

    strategy_name = "pipeline"

    def __init__(self, stage_meshes: list[list[int]] | None = None, mesh_shapes: list[list[int]] | None = None,
                 schedule: Schedule = "eager_1f1b", virtual_stages: int = 1, executor: Executor = "broadcast",
                 sender_mode: SenderMode = "normal", num_microbatches: int = 4, transfer_latency_s: float = 0.0,
                 start_method: StartMethod = "popen",
                 timeout_s: float = 120.0, transport: Transport = "auto", accelerator: Any = None,
                 parallel_devices: list[torch.device] | None = None,
                 cluster_environment: ClusterEnvironment | None = None, checkpoint_io: CheckpointIO | None = None,
                 precision_plugin: Precision | None = None) -> None:
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin, timeout_s=timeout_s, start_method=start_method)
        check_schedule(schedule, virtual_stages)
        check_sender_mode(sender_mode)
        check_transport(transport)
        check_executor(executor)
        if mesh_shapes is not None and (stage_meshes is None or len(mesh_shapes) != len(stage_meshes)):
            raise ValueError("mesh_shapes needs stage_meshes with one shape per stage")
        self._meshes = self._build_meshes(stage_meshes, mesh_shapes) if stage_meshes is not None else None
        self.schedule, self.executor, self.sender_mode = schedule, executor, sender_mode
        self.virtual_stages = virtual_stages
        self.num_microbatches, self.transfer_latency_s = num_microbatches, transfer_latency_s
        self._timeout_s, self.transport = timeout_s, transport
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

    def setup_environment(self) -> None:
        """Refuse unsupported Trainer settings first (``flags.py``): before loggers or checkpoints write anything."""
        check_trainer(self.lightning_module.trainer, self.lightning_module)
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        module = self.lightning_module
        meshes = self.meshes
        pipeline = get_pipeline(module, len(meshes) * self.virtual_stages)
        self._runtime = PipelineRuntime(pipeline, meshes, schedule=self.schedule,
                                        executor=self.executor, sender_mode=self.sender_mode,
                                        num_microbatches=self.num_microbatches,
                                        transfer_latency_s=self.transfer_latency_s, timeout_s=self._timeout_s,
                                        transport=self.transport,
                                        forward_context=self.precision_plugin.train_step_context)
        clip_over_pipeline(self.precision_plugin, self._counted_parameters)

    def _counted_parameters(self, params: list[Tensor]) -> list[Tensor]:
        """The parameters among ``params`` whose gradients this rank counts in the global norm."""
        assert self._runtime is not None
        stages = [stage.module for stage in self._runtime.pipeline.stages]
        return counted_parameters(params, stages, self._runtime.chunk_meshes, self.global_rank)

    def training_step(self, batch: Any, batch_idx: int = 0, *args: Any, **kwargs: Any) -> Tensor:
        assert self._runtime is not None
        params = [p for module in self._runtime.modules for p in module.parameters()]
        accumulated = [p.grad for p in params]  # the earlier batches of an accumulate_grad_batches window
        for p in params:
            p.grad = None  # the step's stage reduction must see this batch's gradients only
        loss = self._runtime.step(batch[0], batch[1])
        # Lightning zeroes gradients between training_step and backward: keep ours aside until then.
        self._pending_grads = [(p, p.grad) for p in params]
        for p, grad in zip(params, accumulated, strict=True):
            p.grad = grad
        self.lightning_module.log("train/loss", loss, prog_bar=True)
        return loss

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        """The pipelined step already ran every backward: hand its gradients to the optimiser step.

        With ``accumulate_grad_batches=N`` Lightning backpropagates ``loss / N`` and sums over the window;
        so this adds ``grad / N`` to what the window holds. The ``on_before_backward`` and
        ``on_after_backward`` hooks run around it, as in a plain run.
        """
        module = self.lightning_module
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        scale = 1.0 / module.trainer.accumulate_grad_batches
        for p, grad in self._pending_grads:
            if grad is None:
                continue
            if scale != 1.0:
                grad.mul_(scale)
            if p.grad is None:
                p.grad = grad
            else:
                p.grad.add_(grad)
        self._pending_grads = []
        return self.precision_plugin.post_backward(closure_loss, module)

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

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """Every stage's optimizer state, merged by parameter on rank 0 (collective, like the state dict).

        A rank's optimizer only has state for its own stage, so rank 0's alone would lose the others'
        Adam moments; the merged dict has the layout of an unpipelined optimizer's state dict.
        """
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        if self._runtime is None:
            return super().optimizer_state(optimizer)
        stages = [stage.module for stage in self._runtime.pipeline.stages]
        owners = state_owners(optimizer_parameters(optimizer), stages, self._runtime.chunk_meshes)
        return gather_optimizer_state(optimizer, owners)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Each rank keeps its own stage's part of the merged state: exactly what it held before saving."""
        if self._runtime is None:
            super().load_optimizer_state_dict(checkpoint)
            return
        stage = nn.ModuleList(self._runtime.modules)
        states = [restrict_state(state, local_indices(optimizer_parameters(optimizer), stage))
                  for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=False)]
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": states})

    def teardown(self) -> None:
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None
        super().teardown()

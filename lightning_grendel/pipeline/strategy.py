"""``PipelineStrategy``: Lightning runs the step, the strategy runs it as a pipeline over stage meshes.

Lightning has no pipeline parallelism since 2.0; DTensor cannot move a tensor between meshes. This
strategy uses the package's cross-mesh resharding for every activation and gradient between stages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_grendel._process_group import ProcessGroupStrategy, StartMethod
from lightning_grendel.pipeline.checkpoint import (
    gather_optimizer_state,
    local_indices,
    optimizer_parameters,
    restrict_state,
)
from lightning_grendel.pipeline.flags import check_trainer
from lightning_grendel.pipeline.module_steps import ModuleSteps, gather_predictions
from lightning_grendel.pipeline.ownership import counted_parameters, owners
from lightning_grendel.pipeline.precision import clip_over_pipeline
from lightning_grendel.pipeline.pytree import sample_count, split_microbatches
from lightning_grendel.pipeline.residency import StageResidency
from lightning_grendel.pipeline.runtime import PipelineRuntime
from lightning_grendel.pipeline.schedules import Schedule, check_schedule, chunk_stages
from lightning_grendel.pipeline.split import TracedPipeline
from lightning_grendel.pipeline.stages import Pipeline, PipelineStage, get_pipeline
from lightning_grendel.pipeline.tied import tie_parameters
from lightning_grendel.pipeline.whole_model import WholeModelAtEnd
from lightning_grendel.resharding.mesh import Mesh, check_disjoint
from lightning_grendel.resharding.plan import Executor, check_executor
from lightning_grendel.resharding.senders import SenderMode, check_sender_mode
from lightning_grendel.resharding.shm import Transport, check_transport


class PipelineStrategy(ProcessGroupStrategy):
    """Pipeline parallelism over stage meshes with cross-mesh resharding (any schedule of ``SCHEDULES``).

    ``stage_meshes`` lists the global ranks of each stage (default: one rank per stage) and
    ``mesh_shapes`` their shapes (default ``(1, n)``). The stages come from ``split_points`` (an
    unmodified module cut by torch's tracer before those submodules) or from the module's
    ``pipeline_stages(self) -> Pipeline`` hook (``virtual_stages`` chunks per stage mesh). The module's
    own ``training_step`` is the loss (run per micro-batch on the last stage with forward returning the
    pipeline's output) unless the hook's ``Pipeline`` has a ``loss`` (then ``train/loss`` is logged);
    ``validate``, ``test`` and ``predict`` run forward-only pipelines the same way. Every rank sees the
    same batches, in the loader's order. What a step logs is the whole batch's value on every rank;
    ``self.log(..., sync_dist=True)`` in a hook reduces over all ranks, as under DDP. A checkpoint is
    one ordinary Lightning file: full parameters, and every stage's optimizer state merged by
    parameter; on resume each rank takes back its stage's part. ``transport`` (``auto``, ``dist``,
    ``shm``) is how activations and gradients move, as in ``reshard()``.
    Trainer flags run as in a plain run or are refused in ``setup_environment`` (``flags.py``;
    docs/pipeline_conformance.md): the precision plugin's step contexts wrap every stage forward and
    loss, norm clipping uses the norm over all stages, ``accumulate_grad_batches`` sums over the window.

    Call order: ``setup_environment`` (refusals, process group), ``setup`` (stages cut or traced, tied
    weights made one before the optimisers exist, the runtime built; a split model's at its first
    batch), then per step ``training_step`` (the whole pipelined forward and backward) and
    ``backward`` (hands the step's gradients to Lightning's optimiser step).

    Args:
        split_points: submodule names (of the LightningModule) before which a new stage starts, e.g.
            ``["model.transformer.encoder"]``; ``len(split_points) + 1`` stages, traced automatically.
        stage_meshes: global ranks of each stage mesh.
        mesh_shapes: shape of each stage mesh.
        schedule: ``gpipe``, ``1f1b``, ``eager_1f1b``, ``interleaved_1f1b`` or ``eager_interleaved_1f1b``
            (both need ``num_microbatches`` a multiple of the number of stage meshes), or ``zb_h1`` (zero
            bubble: backward split into input- and weight-gradient passes, weight passes in the bubbles), or
            ``zbv`` / ``dualpipev`` (two chunks per stage mesh in a V, backward split; ``dualpipev`` needs
            ``num_microbatches`` at least twice the number of stage meshes).
        virtual_stages: model chunks per stage mesh (``v``); chunk ``c`` runs on mesh ``c mod S`` (on mesh
            ``c``, then ``2S-1-c``, for ``zbv`` and ``dualpipev``, which need exactly 2), so
            ``pipeline_stages()`` returns ``v * S`` stages. Above 1 only with the interleaved and V schedules.
        executor: resharding executor (``send_recv``, ``allgather``, ``broadcast`` (default); ``auto``: the fastest
            per boundary tensor and direction, timed once on its transport when the boundary is first planned).
        sender_mode: sender selection of the resharding plans (``normal`` by default; ``auto``: chosen with the
            executor).
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
                 split_points: list[str] | None = None,
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
        self.split_points = split_points
        self._runtime: PipelineRuntime | None = None
        self._pipeline: Pipeline | None = None
        self._steps: ModuleSteps | None = None
        self._residency: StageResidency | None = None
        self._at_end = WholeModelAtEnd(self.sync_parameters)
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
        self.keep_loader_order(trainer)
        module = self.lightning_module
        num_stages = len(self.meshes) * self.virtual_stages
        traced = None
        if self.split_points is not None:
            if hasattr(module, "pipeline_stages"):
                raise ValueError(f"{type(module).__name__} defines pipeline_stages() and the strategy has "
                                 "split_points; use one of them")
            if len(self.split_points) + 1 != num_stages:
                raise ValueError(f"split_points {self.split_points} make {len(self.split_points) + 1} stages but the "
                                 f"strategy runs {num_stages} (stage meshes x virtual stages)")
            traced = TracedPipeline(module, self.split_points, whole_model=self._whole_model)
            if any(mesh.size > 1 for mesh in self.meshes):
                rank_zero_warn("PipelineStrategy(split_points=...) gives every stage a replicated input: the ranks "
                               "of a stage mesh all compute the same samples (data parallelism inside a stage needs "
                               "pipeline_stages() with sharded input specs)")
            pipeline = Pipeline([PipelineStage(stage, meta=stage.meta) for stage in traced.stages])
        else:
            pipeline = get_pipeline(module, num_stages)
            tie_parameters([stage.module for stage in pipeline.stages], pipeline.tied)  # before the optimisers
            pipeline.tied = ()
        super().setup(trainer)
        legacy = pipeline.loss is not None
        if legacy and is_overridden("training_step", module):
            rank_zero_warn(f"{type(module).__name__}.pipeline_stages() returns a Pipeline with a loss, so "
                           "PipelineStrategy trains with that loss and does not run training_step (its extra terms and "
                           "self.log calls are not used); return Pipeline(stages) without a loss to run training_step "
                           "as the loss")
        self._steps = ModuleSteps(module, traced, None if traced is not None else pipeline.inputs, legacy)
        self._pipeline = Pipeline(pipeline.stages, pipeline.loss if legacy else self._steps.loss,
                                  inputs=self._steps.first_input,
                                  target=pipeline.target if legacy else Pipeline.whole_batch())
        clip_over_pipeline(self.precision_plugin, self._counted_parameters)
        self._residency = None
        if self._at_end not in trainer.callbacks:
            trainer.callbacks.insert(0, self._at_end)
        if traced is None:
            self._build_runtime()

    def _stage_meshes(self) -> list[Mesh]:
        """Each stage's (chunk's) mesh, as the schedule places it (``c mod S``, or a V)."""
        assert self._pipeline is not None
        return [self.meshes[s] for s in chunk_stages(self.schedule, len(self.meshes), self.virtual_stages)]

    def _counted_parameters(self, params: list[Tensor]) -> list[Tensor]:
        """The parameters among ``params`` whose gradients this rank counts in the global norm."""
        assert self._pipeline is not None
        stages = [stage.module for stage in self._pipeline.stages]
        return counted_parameters(params, stages, self._stage_meshes(), self.global_rank)

    def _build_runtime(self) -> PipelineRuntime:
        """The runtime (collective); a split model's is built at its first batch, once a trace made the stages."""
        if self._runtime is None:
            assert self._pipeline is not None
            self._runtime = PipelineRuntime(self._pipeline, self.meshes, schedule=self.schedule,
                                            executor=self.executor, sender_mode=self.sender_mode,
                                            num_microbatches=self.num_microbatches,
                                            transfer_latency_s=self.transfer_latency_s, timeout_s=self._timeout_s,
                                            transport=self.transport,
                                            forward_context=self.precision_plugin.train_step_context)
            local = {id(p) for module in self._runtime.modules for p in module.parameters()}
            for optimizer in self.optimizers:  # state loaded before the stages existed: keep this rank's own
                for p in [p for p in optimizer.state if id(p) not in local]:
                    del optimizer.state[p]
            self._residency = StageResidency(self.lightning_module, [stage.module for stage in self._pipeline.stages],
                                             self._stage_meshes(), self.global_rank)
        return self._runtime

    @contextlib.contextmanager
    def _whole_model(self) -> Iterator[None]:
        """Every rank holds every weight inside (collective): a split model's trace runs the whole forward."""
        released = self._residency is not None and self._residency.released
        if released:
            self._residency.materialize()
        try:
            yield
        finally:
            if released:
                self._residency.release()

    def _runtime_for(self, step: str, context: Callable[[], Any], batch: Any, *args: Any) -> PipelineRuntime:
        """Point the module steps at this step and batch; trace a split model on its first micro-batch.

        The trace runs under the step's forward ``context``, as every later one does (a trace is kept
        per autocast state), so a mixed-precision run traces once, with autocast.
        """
        assert self._steps is not None
        self._steps.begin(step, batch, *args)
        if self._runtime is None:
            count = self.num_microbatches if step == "training_step" else min(self.num_microbatches,
                                                                                sample_count(batch))
            with context():
                self._steps.first_input(split_microbatches(batch, count)[0][0])
            self._build_runtime()
        assert self._runtime is not None and self._residency is not None
        self._residency.release()  # from the first step on, other stages' weights are not held here
        return self._runtime

    def training_step(self, batch: Any, batch_idx: int = 0, *args: Any, **kwargs: Any) -> Any:
        runtime = self._runtime_for("training_step", self.precision_plugin.train_step_context, batch, batch_idx)
        module = self.lightning_module
        params = [p for module_ in runtime.modules for p in module_.parameters()]
        accumulated = [p.grad for p in params]  # the earlier batches of an accumulate_grad_batches window
        for p in module.parameters():
            p.grad = None  # the stage reduction sees this batch's gradients only; strays are found below
        loss = runtime.step(batch)
        self._check_gradients(runtime)
        # Lightning zeroes gradients between training_step and backward: keep ours aside until then.
        self._pending_grads = [(p, p.grad) for p in params]
        for p, grad in zip(params, accumulated, strict=True):
            p.grad = grad
        assert self._steps is not None
        if self._steps.legacy_loss:
            module.log("train/loss", loss, prog_bar=True)
            return loss
        outputs = self._steps.publish(runtime.contributes())
        return {"loss": loss, **outputs} if isinstance(outputs, dict) else loss

    def _check_gradients(self, runtime: PipelineRuntime) -> None:
        """What went wrong in the module's step on any rank (a loss term on another stage's parameter, forward
        called twice) is raised on every rank."""
        assert self._steps is not None
        if self._steps.legacy_loss:
            return
        mine = {id(p) for module in runtime.modules for p in module.parameters()}
        module = self.lightning_module
        self._steps.check([name for name, p in module.named_parameters() if p.grad is not None and id(p) not in mine])

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

    def _evaluate(self, step: str, context: Callable[[], Any], batch: Any, batch_idx: int, *args: Any) -> Any:
        """A forward-only pipeline; the module's own step runs on the last stage (under the precision
        plugin's ``context`` for that step), its logs on every rank."""
        runtime = self._runtime_for(step, context, batch, batch_idx, *args)
        assert self._steps is not None
        results = runtime.evaluate(batch, self._steps.evaluate, context)
        self._steps.check([])
        if step == "predict_step":
            return gather_predictions(results, runtime.contributes())
        return self._steps.publish(runtime.contributes())

    def validation_step(self, batch: Any, batch_idx: int = 0, *args: Any, **kwargs: Any) -> Any:
        return self._evaluate("validation_step", self.precision_plugin.val_step_context, batch, batch_idx, *args)

    def test_step(self, batch: Any, batch_idx: int = 0, *args: Any, **kwargs: Any) -> Any:
        return self._evaluate("test_step", self.precision_plugin.test_step_context, batch, batch_idx, *args)

    def predict_step(self, batch: Any, batch_idx: int = 0, *args: Any, **kwargs: Any) -> Any:
        return self._evaluate("predict_step", self.precision_plugin.predict_step_context, batch, batch_idx, *args)

    def sync_parameters(self) -> None:
        """Collective: every rank holds every stage's current parameters again, until the next pipelined step.

        Runs when a Trainer call ends (``WholeModelAtEnd``), so the module is whole afterwards.
        """
        if self._residency is not None:
            self._residency.materialize()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full state dict on rank 0 (a checkpoint): while other stages' weights are released, a
        collective in which each tensor is sent once by its owner; otherwise every rank's are current."""
        if self._residency is None or not self._residency.released:
            return super().lightning_module_state_dict()
        return self._residency.state_dict(dst=0)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """Every stage's optimizer state, merged by parameter on rank 0 (collective, like the state dict).

        A rank's optimizer only has state for its own stage, so rank 0's alone would lose the others'
        Adam moments; the merged dict has the layout of an unpipelined optimizer's state dict.
        """
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        if self._pipeline is None or not torch.distributed.is_initialized():
            return super().optimizer_state(optimizer)
        stages = [stage.module for stage in self._pipeline.stages]  # also after fit, once the runtime is closed
        return gather_optimizer_state(optimizer, owners(optimizer_parameters(optimizer), stages, self._stage_meshes()))

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

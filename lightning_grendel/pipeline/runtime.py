"""One rank's part of a pipelined training step: run its stage's schedule, reshard across meshes.

Kept apart from Lightning so it can be tested (and used) with plain ``torch.distributed``. Sends go
through an outbox thread, so a stage moves on to its next action as soon as an output exists and the
transfer overlaps compute; an optional per-transfer delay emulates a slow link. With ``v`` virtual
stages the pipeline has ``v * S`` chunks and chunk ``c`` runs on stage mesh ``c mod S``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist

from lightning_grendel.pipeline.meta_forward import autocast_state, meta_forward
from lightning_grendel.pipeline.outbox import Outbox, input_gradient, weight_gradient
from lightning_grendel.pipeline.schedules import Schedule, check_schedule, stage_order
from lightning_grendel.pipeline.stages import Pipeline, output_spec, resolve_stage_specs
from lightning_grendel.pipeline.tensor_parallel import find_linear, make_column_parallel
from lightning_grendel.resharding.executors import GroupCache, start_plan, transport_pairs
from lightning_grendel.resharding.mesh import Mesh, ShardingSpec, check_disjoint, chunk_bounds, local_box
from lightning_grendel.resharding.plan import Executor, ReshardPlan, check_executor, make_plan
from lightning_grendel.resharding.senders import SenderMode, check_sender_mode
from lightning_grendel.resharding.shm import Transport, arenas_for, check_transport, create_arenas

_FORWARD, _BACKWARD = 0, 1


class PipelineRuntime:
    """Runs pipelined training steps for the stage that ``rank`` belongs to.

    Every rank of the default process group must construct it and call :meth:`step` with the same
    batch: plans are derived identically everywhere and process groups are created in one order.
    ``transport`` is that of :func:`reshard` (``auto``: shared memory for the transfers among ranks on
    one host, torch.distributed across hosts; see :meth:`transports`). ``forward_context`` is entered
    around every stage forward and loss (not around backward), as Lightning's precision plugin wraps
    ``training_step``: autocast for mixed precision, the default dtype for true half precision.
    """

    def __init__(self, pipeline: Pipeline, meshes: Sequence[Mesh], *, schedule: Schedule = "eager_1f1b",
                 executor: Executor = "broadcast", sender_mode: SenderMode = "normal", num_microbatches: int = 4,
                 transfer_latency_s: float = 0.0, timeout_s: float = 120.0, transport: Transport = "auto",
                 forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext) -> None:
        check_transport(transport)
        check_sender_mode(sender_mode)
        check_executor(executor)
        if num_microbatches < 1:
            raise ValueError("num_microbatches must be >= 1")
        check_disjoint(meshes)
        num_chunks = len(pipeline.stages)
        if num_chunks % len(meshes):
            raise ValueError(f"{num_chunks} stages (model chunks) do not divide over {len(meshes)} stage meshes")
        self.virtual_stages = num_chunks // len(meshes)
        self._split_backward = check_schedule(schedule, self.virtual_stages).split_backward
        if self.virtual_stages > 1 and len(meshes) < 2:
            raise ValueError("virtual stages need at least 2 stage meshes (consecutive chunks on different meshes)")
        self.pipeline, self.meshes = pipeline, list(meshes)
        self.chunk_meshes = [self.meshes[c % len(meshes)] for c in range(num_chunks)]
        self.schedule, self.executor, self.sender_mode = schedule, executor, sender_mode
        self.num_microbatches = num_microbatches
        self._forward_context = forward_context
        self.rank = dist.get_rank()
        world = dist.get_world_size()
        used = sorted(r for mesh in self.meshes for r in mesh.ranks)
        if used != list(range(world)):
            raise ValueError(f"stage meshes must cover ranks 0..{world - 1} exactly once, got {used}")
        self.stage = next(i for i, mesh in enumerate(self.meshes) if self.rank in mesh.ranks)
        self._order = stage_order(schedule, self.stage, len(meshes), num_microbatches, self.virtual_stages)
        self.chunks = list(range(self.stage, num_chunks, len(meshes)))
        self.modules = [pipeline.stages[c].module for c in self.chunks]
        if pipeline.stages[-1].column_parallel is not None:
            raise ValueError("the last stage feeds the loss and cannot be column-parallel")
        for index, (stage, mesh) in enumerate(zip(pipeline.stages, self.chunk_meshes, strict=True)):
            resolve_stage_specs(stage, mesh, index, None)
            if stage.column_parallel is not None:
                find_linear(stage.module, stage.column_parallel)
        owner: dict[int, int] = {}
        for index, stage in enumerate(pipeline.stages):
            for p in stage.module.parameters():
                if p.requires_grad and owner.setdefault(id(p), index) != index:
                    raise ValueError(f"a trainable parameter is shared by stages {owner[id(p)]} and {index}; "
                                     "tied weights across stages are not supported")
        self._meta = [copy.deepcopy(stage.module).to("meta") for stage in pipeline.stages]
        self._groups = (GroupCache(timeout_s), GroupCache(timeout_s))  # one set per direction (lane)
        self._stage_groups = [dist.new_group(list(mesh.ranks)) for mesh in self.meshes]
        self._tp_parts: dict[int, int] = {}
        for index, (stage, mesh) in enumerate(zip(pipeline.stages, self.chunk_meshes, strict=True)):
            if stage.column_parallel is None:
                continue
            for ranks in mesh.axis_groups(mesh.ndim - 1):  # every rank creates every group, in one order
                group = dist.new_group(list(ranks))
                if index in self.chunks and self.rank in ranks:
                    linear = find_linear(stage.module, stage.column_parallel)
                    self._tp_parts[index] = mesh.shape[-1]
                    make_column_parallel(linear, mesh.coordinate(self.rank)[-1], mesh.shape[-1], group)
        self._shm = []
        for _ in (_FORWARD, _BACKWARD):
            arenas = create_arenas() if transport != "dist" else None
            try:
                self._shm.append(arenas_for(transport, arenas, used))
            except ValueError:
                for made in [*self._shm, arenas]:
                    if made is not None:
                        made.close()
                raise
            if arenas is not None and self._shm[-1] is None:
                arenas.close()
        self._outboxes = [Outbox(self.rank, self._groups[d], transfer_latency_s, self._shm[d])
                          for d in (_FORWARD, _BACKWARD)]
        self._layouts: dict[tuple, list[tuple[ShardingSpec, ShardingSpec, tuple[int, ...], torch.dtype]]] = {}
        self._plans: dict[tuple, tuple[list[ReshardPlan], list[ReshardPlan], int]] = {}

    def _key(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple:
        """What a micro-batch's layouts depend on: its shape and dtype, and the autocast of the forward context."""
        with self._forward_context():
            return shape, dtype, device.type, autocast_state(device.type)

    def _layout(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        """Per stage: (input spec, output spec, full output shape, output dtype) for a micro-batch of ``shape``.

        Dtypes are those of the real forward on ``device`` under the forward context (autocast).
        """
        key = self._key(shape, dtype, device)
        if key not in self._layouts:
            layouts = []
            x = torch.empty(shape, dtype=dtype, device="meta")
            for index, (stage, meta) in enumerate(zip(self.pipeline.stages, self._meta, strict=True)):
                mesh = self.chunk_meshes[index]
                in_spec = resolve_stage_specs(stage, mesh, index, x.ndim)
                in_spec.validate(mesh, x.shape)
                with self._forward_context():
                    x = meta_forward(meta, x, device)
                tp_axis = None if stage.column_parallel is None else mesh.ndim - 1
                out_spec = output_spec(in_spec, x.ndim, tp_axis)
                out_spec.validate(mesh, x.shape)
                layouts.append((in_spec, out_spec, tuple(x.shape), x.dtype))
            self._layouts[key] = layouts
        return self._layouts[key]

    def _boundary_plans(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        """Forward and backward plans of every chunk boundary; groups made in one order on all ranks."""
        key = self._key(shape, dtype, device)
        if key not in self._plans:
            layouts = self._layout(shape, dtype, device)
            forward, backward = [], []
            meshes = self.chunk_meshes
            for c in range(len(meshes) - 1):
                _, out_spec, out_shape, out_dtype = layouts[c]
                in_spec = layouts[c + 1][0]
                forward.append(make_plan(out_shape, out_dtype, meshes[c], out_spec, meshes[c + 1], in_spec,
                                         self.executor, self.sender_mode))
                backward.append(make_plan(out_shape, out_dtype, meshes[c + 1], in_spec, meshes[c],
                                          out_spec, self.executor, self.sender_mode))
            for plan in forward:
                self._groups[_FORWARD].ensure(plan.groups())
            for plan in backward:
                self._groups[_BACKWARD].ensure(plan.groups())
            span = max((len(plan.ops) for plan in forward + backward), default=0) + 1
            self._plans[key] = (forward, backward, span)
        return self._plans[key]

    def transports(self) -> set[tuple[str, int, int, str]]:
        """``(direction, from rank, to rank, "shm" or "dist")`` of every chunk boundary planned so far.

        Which transport moves activations (``forward``) and gradients (``backward``) between which
        ranks, as decided by :func:`transport_pairs`; plans exist after the first :meth:`step`.
        """
        return {(name, *pair) for forward, backward, _ in self._plans.values()
                for name, direction, plans in (("forward", _FORWARD, forward), ("backward", _BACKWARD, backward))
                for plan in plans for pair in transport_pairs(plan, self._shm[direction])}

    def _tag(self, microbatch: int, direction: int, boundary: int, span: int) -> int:
        return ((microbatch * 2 + direction) * len(self.chunk_meshes) + boundary) * span

    def _receive(self, plan: ReshardPlan, direction: int, tag: int) -> torch.Tensor:
        return start_plan(plan, self.rank, None, self._groups[direction], tag, self._shm[direction]).wait()

    def step(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Forward and backward of every micro-batch; gradients accumulate in the rank's chunks' parameters.

        Returns the full-batch loss on every rank (detached).
        """
        total_rows = inputs.shape[0]
        if total_rows < self.num_microbatches:
            raise ValueError(f"batch of {total_rows} rows cannot be cut into {self.num_microbatches} micro-batches")
        micro_inputs = inputs.tensor_split(self.num_microbatches)  # exactly as many as the order expects
        micro_targets = target.tensor_split(self.num_microbatches)
        last = len(self.chunk_meshes) - 1
        mesh = self.meshes[self.stage]
        held: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        weight_grads: dict[tuple[int, int], torch.Tensor | None] = {}
        loss_sum = torch.zeros((), dtype=torch.float64)
        for action in self._order:
            c, m = action.chunk, action.microbatch
            shape, dtype, device = tuple(micro_inputs[m].shape), micro_inputs[m].dtype, micro_inputs[m].device
            forward, backward, span = self._boundary_plans(shape, dtype, device)
            in_spec, out_spec, out_shape, _ = self._layout(shape, dtype, device)[c]
            module = self.pipeline.stages[c].module
            if action.kind == "F":
                if c == 0:
                    box = local_box(mesh, in_spec, shape, self.rank)
                    x = micro_inputs[m][tuple(slice(a, b) for a, b in box)]
                else:
                    x = self._receive(forward[c - 1], _FORWARD, self._tag(m, _FORWARD, c - 1, span))
                    x.requires_grad_(x.is_floating_point())
                with self._forward_context():
                    y = module(x)
                    if c == last:
                        rows = local_box(mesh, out_spec, out_shape, self.rank)[0]
                        if rows[1] > rows[0]:
                            share = (rows[1] - rows[0]) / total_rows
                            y = self.pipeline.loss(y, micro_targets[m][rows[0]:rows[1]]) * share
                        else:
                            y = y.sum() * 0.0
                if c < last:
                    self._outboxes[_FORWARD].put(forward[c], y.detach(), self._tag(m, _FORWARD, c, span))
                else:
                    loss_sum += y.detach().double()
                held[(c, m)] = (x, y)
            elif action.kind == "B":
                x, y = held[(c, m)]
                grad = None if c == last else self._receive(backward[c], _BACKWARD, self._tag(m, _BACKWARD, c, span))
                if self._split_backward:
                    x_grad = input_gradient(x, y, grad)
                    weight_grads[(c, m)] = grad
                else:
                    del held[(c, m)]
                    y.backward(grad)
                    x_grad = x.grad if x.requires_grad else None
                if c > 0 and x_grad is not None:
                    self._outboxes[_BACKWARD].put(backward[c - 1], x_grad, self._tag(m, _BACKWARD, c - 1, span))
            else:
                _, y = held.pop((c, m))
                weight_gradient(y, weight_grads.pop((c, m)), [p for p in module.parameters() if p.requires_grad])
        for outbox in self._outboxes:
            outbox.flush()
        self._reduce_stage_gradients()
        if last in self.chunks:
            loss_sum /= self._replication(mesh, ShardingSpec.parse(self.pipeline.stages[last].input_spec))
        else:
            loss_sum.zero_()
        dist.all_reduce(loss_sum)
        return loss_sum.float()

    @staticmethod
    def _replication(mesh: Mesh, spec: ShardingSpec) -> int:
        """How many ranks of a stage mesh hold the same rows."""
        return mesh.size // spec.num_chunks(mesh, 0)

    def _reduce_stage_gradients(self) -> None:
        """Data parallel inside the stage mesh: sum row-weighted gradients, undo replica double counting."""
        mesh = self.meshes[self.stage]
        if mesh.size == 1:
            return
        params = [(c, p) for c in self.chunks for p in self.pipeline.stages[c].module.parameters()
                  if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for _, p in params])
        dist.all_reduce(flat, group=self._stage_groups[self.stage])
        replication = {c: self._replication(mesh, ShardingSpec.parse(self.pipeline.stages[c].input_spec))
                       for c in self.chunks}
        tensor_parallel = {id(p) for c in self.chunks for p in self._column_parallel_params(c)}
        offset = 0
        for c, p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad)).div_(replication[c])
            if id(p) in tensor_parallel:  # each row block came from the ranks of one TP slice only
                p.grad.mul_(self._tp_parts[c])
            offset += p.numel()

    def _column_parallel_params(self, stage: int) -> list[torch.Tensor]:
        name = self.pipeline.stages[stage].column_parallel
        if name is None:
            return []
        linear = find_linear(self.pipeline.stages[stage].module, name)
        return [p for p in (linear.weight, linear.bias) if p is not None]

    def sync_parameters(self) -> None:
        """Give every rank every chunk's current parameters (collective; same order on every rank).

        Column-parallel rows come from the first rank holding each slice, everything else from the
        chunk's stage mesh's first rank.
        """
        for index, (stage, mesh) in enumerate(zip(self.pipeline.stages, self.chunk_meshes, strict=True)):
            sliced = {id(p) for p in self._column_parallel_params(index)}
            for tensor in [*stage.module.parameters(), *stage.module.buffers()]:
                if id(tensor) not in sliced:
                    dist.broadcast(tensor.data, src=mesh.ranks[0])
                    continue
                parts = mesh.shape[-1]
                for j in range(parts):
                    start, stop = chunk_bounds(tensor.shape[0], parts, j)
                    piece = tensor.data[start:stop].contiguous()
                    dist.broadcast(piece, src=mesh.rank_at((0,) * (mesh.ndim - 1) + (j,)))
                    tensor.data[start:stop].copy_(piece)

    def close(self) -> None:
        for outbox in self._outboxes:
            outbox.close()
        for arenas in self._shm:
            if arenas is not None:
                arenas.close()

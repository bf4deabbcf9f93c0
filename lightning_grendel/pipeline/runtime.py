"""One rank's part of a pipelined training step: run its stage's schedule, reshard across meshes.

Kept apart from Lightning so it can be tested (and used) with plain ``torch.distributed``. Sends go
through an outbox thread, so a stage moves on to its next action as soon as an output exists and the
transfer overlaps compute; an optional per-transfer delay emulates a slow link.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from lightning_grendel.pipeline.schedules import Schedule, check_schedule, stage_order
from lightning_grendel.pipeline.stages import Pipeline, output_spec, resolve_stage_specs
from lightning_grendel.pipeline.tensor_parallel import find_linear, make_column_parallel
from lightning_grendel.resharding.executors import GroupCache, start_plan
from lightning_grendel.resharding.mesh import Mesh, ShardingSpec, check_disjoint, chunk_bounds, local_box
from lightning_grendel.resharding.plan import Executor, ReshardPlan, check_executor, make_plan
from lightning_grendel.resharding.senders import SenderMode, check_sender_mode
from lightning_grendel.resharding.shm import SharedMemoryArenas, Transport, arenas_for, check_transport, create_arenas

_FORWARD, _BACKWARD = 0, 1


class _Outbox:
    """FIFO of outgoing reshardings run by one thread, each started no earlier than ``latency_s``."""

    def __init__(self, rank: int, groups: GroupCache, latency_s: float, shm: SharedMemoryArenas | None) -> None:
        self._rank, self._groups, self._latency, self._shm = rank, groups, latency_s, shm
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def put(self, plan: ReshardPlan, tensor: torch.Tensor, tag: int) -> None:
        self._queue.put((time.perf_counter() + self._latency, plan, tensor, tag))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            due, plan, tensor, tag = item
            try:
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                if self._error is None:
                    start_plan(plan, self._rank, tensor, self._groups, tag, self._shm).wait()
            except BaseException as error:  # noqa: BLE001 - re-raised on the main thread in flush()
                self._error = error
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        self._queue.join()
        if self._error is not None:
            raise RuntimeError("a pipeline send failed") from self._error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)


class PipelineRuntime:
    """Runs pipelined training steps for the stage that ``rank`` belongs to.

    Every rank of the default process group must construct it and call :meth:`step` with the same
    batch: plans are derived identically everywhere and process groups are created in one order.
    ``transport`` is that of :func:`reshard` (``auto``: shared memory when every rank is on this host
    and the backend is gloo).
    """

    def __init__(self, pipeline: Pipeline, meshes: Sequence[Mesh], *, schedule: Schedule = "eager_1f1b",
                 executor: Executor = "broadcast", sender_mode: SenderMode = "normal", num_microbatches: int = 4,
                 transfer_latency_s: float = 0.0, timeout_s: float = 120.0, transport: Transport = "auto") -> None:
        check_schedule(schedule)
        check_transport(transport)
        check_sender_mode(sender_mode)
        check_executor(executor)
        if num_microbatches < 1:
            raise ValueError("num_microbatches must be >= 1")
        check_disjoint(meshes)
        if len(pipeline.stages) != len(meshes):
            raise ValueError(f"{len(pipeline.stages)} stages but {len(meshes)} stage meshes")
        self.pipeline, self.meshes = pipeline, list(meshes)
        self.schedule, self.executor, self.sender_mode = schedule, executor, sender_mode
        self.num_microbatches = num_microbatches
        self.rank = dist.get_rank()
        world = dist.get_world_size()
        used = sorted(r for mesh in self.meshes for r in mesh.ranks)
        if used != list(range(world)):
            raise ValueError(f"stage meshes must cover ranks 0..{world - 1} exactly once, got {used}")
        self.stage = next(i for i, mesh in enumerate(self.meshes) if self.rank in mesh.ranks)
        self.module = pipeline.stages[self.stage].module
        if pipeline.stages[-1].column_parallel is not None:
            raise ValueError("the last stage feeds the loss and cannot be column-parallel")
        for index, (stage, mesh) in enumerate(zip(pipeline.stages, self.meshes, strict=True)):
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
        self._groups = GroupCache(timeout_s)
        self._stage_groups = [dist.new_group(list(mesh.ranks)) for mesh in self.meshes]
        self._tp_parts = 1
        for index, (stage, mesh) in enumerate(zip(pipeline.stages, self.meshes, strict=True)):
            if stage.column_parallel is None:
                continue
            for ranks in mesh.axis_groups(mesh.ndim - 1):  # every rank creates every group, in one order
                group = dist.new_group(list(ranks))
                if index == self.stage and self.rank in ranks:
                    linear = find_linear(stage.module, stage.column_parallel)
                    self._tp_parts = mesh.shape[-1]
                    make_column_parallel(linear, mesh.coordinate(self.rank)[-1], self._tp_parts, group)
        arenas = create_arenas() if transport != "dist" else None
        self._shm = arenas_for(transport, arenas, used)
        if arenas is not None and self._shm is None:
            arenas.close()
        self._outbox = _Outbox(self.rank, self._groups, transfer_latency_s, self._shm)
        self._layouts: dict[tuple, list[tuple[ShardingSpec, ShardingSpec, tuple[int, ...], torch.dtype]]] = {}
        self._plans: dict[tuple, tuple[list[ReshardPlan], list[ReshardPlan], int]] = {}

    def _layout(self, shape: tuple[int, ...], dtype: torch.dtype):
        """Per stage: (input spec, output spec, full output shape) for a micro-batch of ``shape``."""
        key = (shape, dtype)
        if key not in self._layouts:
            layouts = []
            x = torch.empty(shape, dtype=dtype, device="meta")
            for index, (stage, meta) in enumerate(zip(self.pipeline.stages, self._meta, strict=True)):
                in_spec = resolve_stage_specs(stage, self.meshes[index], index, x.ndim)
                in_spec.validate(self.meshes[index], x.shape)
                with torch.no_grad():
                    x = meta(x)
                tp_axis = None if stage.column_parallel is None else self.meshes[index].ndim - 1
                out_spec = output_spec(in_spec, x.ndim, tp_axis)
                out_spec.validate(self.meshes[index], x.shape)
                layouts.append((in_spec, out_spec, tuple(x.shape), x.dtype))
            self._layouts[key] = layouts
        return self._layouts[key]

    def _boundary_plans(self, shape: tuple[int, ...], dtype: torch.dtype):
        """Forward and backward plans of every stage boundary; groups made in one order on all ranks."""
        key = (shape, dtype)
        if key not in self._plans:
            layouts = self._layout(shape, dtype)
            forward, backward = [], []
            for s in range(len(self.meshes) - 1):
                _, out_spec, out_shape, out_dtype = layouts[s]
                in_spec = layouts[s + 1][0]
                forward.append(make_plan(out_shape, out_dtype, self.meshes[s], out_spec, self.meshes[s + 1], in_spec,
                                         self.executor, self.sender_mode))
                backward.append(make_plan(out_shape, out_dtype, self.meshes[s + 1], in_spec, self.meshes[s],
                                          out_spec, self.executor, self.sender_mode))
            for plan in forward + backward:
                self._groups.ensure(plan.groups())
            span = max((len(plan.ops) for plan in forward + backward), default=0) + 1
            self._plans[key] = (forward, backward, span)
        return self._plans[key]

    def _tag(self, microbatch: int, direction: int, boundary: int, span: int) -> int:
        return ((microbatch * 2 + direction) * len(self.meshes) + boundary) * span

    def step(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Forward and backward of every micro-batch; gradients accumulate in the stage's parameters.

        Returns the full-batch loss on every rank (detached).
        """
        total_rows = inputs.shape[0]
        if total_rows < self.num_microbatches:
            raise ValueError(f"batch of {total_rows} rows cannot be cut into {self.num_microbatches} micro-batches")
        micro_inputs = inputs.chunk(self.num_microbatches)
        micro_targets = target.chunk(self.num_microbatches)
        s, last = self.stage, len(self.meshes) - 1
        mesh = self.meshes[s]
        saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        loss_sum = torch.zeros((), dtype=torch.float64)
        for action in stage_order(self.schedule, s, len(self.meshes), len(micro_inputs)):
            m = action.microbatch
            shape, dtype = tuple(micro_inputs[m].shape), micro_inputs[m].dtype
            layouts = self._layout(shape, dtype)
            forward, backward, span = self._boundary_plans(shape, dtype)
            in_spec, out_spec, out_shape, _ = layouts[s]
            if action.kind == "F":
                if s == 0:
                    box = local_box(mesh, in_spec, shape, self.rank)
                    x = micro_inputs[m][tuple(slice(a, b) for a, b in box)]
                else:
                    x = start_plan(forward[s - 1], self.rank, None, self._groups,
                                   self._tag(m, _FORWARD, s - 1, span), self._shm).wait()
                    x.requires_grad_(x.is_floating_point())
                y = self.module(x)
                if s < last:
                    self._outbox.put(forward[s], y.detach(), self._tag(m, _FORWARD, s, span))
                    saved[m] = (x, y)
                else:
                    rows = local_box(mesh, out_spec, out_shape, self.rank)[0]
                    if rows[1] > rows[0]:
                        share = (rows[1] - rows[0]) / total_rows
                        loss = self.pipeline.loss(y, micro_targets[m][rows[0]:rows[1]]) * share
                    else:
                        loss = y.sum() * 0.0
                    loss_sum += loss.detach().double()
                    saved[m] = (x, loss)
            else:
                x, y = saved.pop(m)
                if s == last:
                    y.backward()
                else:
                    grad = start_plan(backward[s], self.rank, None, self._groups,
                                      self._tag(m, _BACKWARD, s, span), self._shm).wait()
                    y.backward(grad)
                if s > 0 and x.requires_grad:
                    self._outbox.put(backward[s - 1], x.grad, self._tag(m, _BACKWARD, s - 1, span))
        self._outbox.flush()
        self._reduce_stage_gradients()
        if s == last:
            loss_sum /= self._replication(mesh, ShardingSpec.parse(self.pipeline.stages[s].input_spec))
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
        params = [p for p in self.module.parameters() if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, group=self._stage_groups[self.stage])
        spec = ShardingSpec.parse(self.pipeline.stages[self.stage].input_spec)
        flat /= self._replication(mesh, spec)
        tensor_parallel = {id(p) for p in self._column_parallel_params(self.stage)}
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            if id(p) in tensor_parallel:  # each row block came from the ranks of one TP slice only
                p.grad.mul_(self._tp_parts)
            offset += p.numel()

    def _column_parallel_params(self, stage: int) -> list[torch.Tensor]:
        name = self.pipeline.stages[stage].column_parallel
        if name is None:
            return []
        linear = find_linear(self.pipeline.stages[stage].module, name)
        return [p for p in (linear.weight, linear.bias) if p is not None]

    def sync_parameters(self) -> None:
        """Give every rank every stage's current parameters (collective; same order on every rank).

        Column-parallel rows come from the first rank holding each slice, everything else from the
        stage mesh's first rank.
        """
        for index, (stage, mesh) in enumerate(zip(self.pipeline.stages, self.meshes, strict=True)):
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
        self._outbox.close()
        if self._shm is not None:
            self._shm.close()

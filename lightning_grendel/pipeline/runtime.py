"""One rank's part of a pipelined step: run its stage's schedule, reshard every boundary across meshes.

Kept apart from Lightning so it can be tested (and used) with plain ``torch.distributed``. Sends go
through an outbox thread, so a stage moves on to its next action as soon as an output exists and the
transfer overlaps compute; every forward and loss runs on the calling thread. With ``v`` virtual
stages the pipeline has ``v * S`` chunks placed by the schedule: chunk ``c`` on stage mesh ``c mod S``,
or in a V (``zbv``, ``dualpipev``: mesh ``c``, then ``2S-1-c``), where the turn from chunk ``S-1`` to
chunk ``S`` stays on one mesh and passes its tensors without a transfer. Stage inputs
and outputs are pytrees: each tensor leaf crosses a boundary through its own resharding plan.
A forward context (the precision plugin's autocast or default dtype) is entered around every forward
and loss, never around backward, and the layouts and plans are kept per autocast state.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten

from lightning_grendel.pipeline.meta_forward import autocast_state, meta_forward
from lightning_grendel.pipeline.outbox import Outbox
from lightning_grendel.pipeline.ownership import parameter_users
from lightning_grendel.pipeline.pytree import (
    Layout,
    input_layout,
    output_layout,
    rows_of,
    sample_count,
    signature,
    split_microbatches,
    take_rows,
    to_meta,
)
from lightning_grendel.pipeline.schedule_orders import Action
from lightning_grendel.pipeline.schedules import Schedule, boundary_lanes, check_schedule, chunk_stages, stage_order
from lightning_grendel.pipeline.split_backward import WeightPass, input_gradient
from lightning_grendel.pipeline.stages import Pipeline
from lightning_grendel.pipeline.tensor_parallel import find_linear, make_column_parallel
from lightning_grendel.pipeline.tied import TiedGradients, tie_parameters
from lightning_grendel.resharding.auto import resolve_plan
from lightning_grendel.resharding.executors import GroupCache, start_plan, transport_pairs
from lightning_grendel.resharding.mesh import Mesh, check_disjoint, local_box
from lightning_grendel.resharding.plan import Executor, ReshardPlan, check_executor
from lightning_grendel.resharding.senders import SenderMode, check_sender_mode
from lightning_grendel.resharding.shm import Transport, arenas_for, check_transport, create_arenas

_FORWARD, _BACKWARD = 0, 1


@dataclass(frozen=True)
class _ChunkLayout:
    """A chunk's input and output layouts (no output for the last chunk) and the axes its samples span."""

    inputs: Layout
    outputs: Layout | None
    batch_axes: tuple[int, ...]


@dataclass(frozen=True)
class _Boundary:
    """Per tensor leaf of a boundary: the forward plan, the backward plan (differentiable leaves), tag offsets.

    ``part``: which of the schedule's transfer lanes per direction it uses (``schedules.boundary_lanes``).
    A boundary between two chunks on the same mesh (a V's turn) is ``local``: no plans, its tensors
    are handed over in-process.
    """

    forward: list[ReshardPlan]
    backward: list[ReshardPlan | None]
    offsets: list[int]
    part: int = 0
    local: bool = False


class PipelineRuntime:
    """Runs pipelined training steps and forward-only evaluation for the stage that ``rank`` belongs to.

    Every rank of the default process group must construct it and call :meth:`step` (or
    :meth:`evaluate`) with the same batch: plans are derived identically everywhere and process groups
    are created in one order. ``transport`` is that of :func:`reshard` (``auto``: shared memory for the
    transfers among ranks on one host, torch.distributed across hosts; see :meth:`transports`).
    ``forward_context`` is entered around every stage forward and loss of :meth:`step` (not around
    backward), as Lightning's precision plugin wraps ``training_step``: autocast for mixed precision,
    the default dtype for true half precision; :meth:`evaluate` takes its own.
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
        if pipeline.loss is None:
            raise ValueError("the pipeline has no loss: give Pipeline(loss=...)")
        check_disjoint(meshes)
        num_chunks = len(pipeline.stages)
        if num_chunks % len(meshes):
            raise ValueError(f"{num_chunks} stages (model chunks) do not divide over {len(meshes)} stage meshes")
        self.virtual_stages = num_chunks // len(meshes)
        self._split_backward = check_schedule(schedule, self.virtual_stages).split_backward
        if self.virtual_stages > 1 and len(meshes) < 2:
            raise ValueError("virtual stages need at least 2 stage meshes (consecutive chunks on different meshes)")
        self.pipeline, self.meshes = pipeline, list(meshes)
        placed = chunk_stages(schedule, len(meshes), self.virtual_stages)
        self.chunk_meshes = [self.meshes[stage] for stage in placed]
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
        self.chunks = [c for c, stage in enumerate(placed) if stage == self.stage]
        self._handed: dict[tuple[int, int], list[torch.Tensor]] = {}  # same-mesh boundaries: (direction, tag)
        stage_modules = [stage.module for stage in pipeline.stages]
        tie_parameters(stage_modules, pipeline.tied)
        self.modules = [stage_modules[c] for c in self.chunks]
        if pipeline.stages[-1].column_parallel is not None:
            raise ValueError("the last stage feeds the loss and cannot be column-parallel")
        users = parameter_users(stage_modules)
        for index, stage in enumerate(pipeline.stages):
            if stage.column_parallel is None:
                continue
            for p in (find_linear(stage.module, stage.column_parallel).parameters()):
                if len(users.get(id(p), (None, []))[1]) > 1:
                    raise ValueError(f"stage {index}: the column-parallel Linear {stage.column_parallel!r} has a "
                                     "weight tied to another stage; tied weights cannot be column-parallel")
        self._meta = {c: copy.deepcopy(stage.module).to("meta")  # before any Linear is made column-parallel
                      for c, stage in enumerate(pipeline.stages) if stage.meta is None}
        self._parts = boundary_lanes(schedule, len(meshes), self.virtual_stages)
        lanes = 2 * (max(self._parts, default=0) + 1)  # lane 2 * part + direction
        self._groups = [GroupCache(timeout_s) for _ in range(lanes)]  # one set per lane
        self._stage_groups = [dist.new_group(list(mesh.ranks)) for mesh in self.meshes]
        self._tied = TiedGradients(stage_modules, self.chunk_meshes, self.rank, timeout_s)
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
        for _ in range(lanes):
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
        self._outboxes = [Outbox(self.rank, self._groups[lane], transfer_latency_s, self._shm[lane])
                          for lane in range(lanes)]
        self._layouts: dict[Hashable, list[_ChunkLayout]] = {}
        self._plans: dict[Hashable, tuple[list[_Boundary], int]] = {}

    # -- layouts and plans ------------------------------------------------------------------------------

    def _meta_forward(self, chunk: int, x: Any, device: torch.device) -> Any:
        stage = self.pipeline.stages[chunk]
        return stage.meta(x) if stage.meta is not None else meta_forward(self._meta[chunk], (x,), device)

    def _prepare(self, first_input: Any, samples: int) -> Hashable:
        """The layout key of a micro-batch (call under the forward context); its layouts and plans made now.

        Layouts depend on the first-stage input's signature and device and on the autocast state the
        forwards will run under (it changes output dtypes): a meta pass under the same context.
        """
        device = _device_of(first_input)
        key = (signature(first_input), samples, device.type, autocast_state(device.type))
        if key not in self._layouts:
            self._layouts[key] = self._make_layouts(first_input, samples, device)
        if key not in self._plans:
            self._plans[key] = self._make_boundaries(self._layouts[key], device)
        return key

    def _make_layouts(self, first_input: Any, samples: int, device: torch.device) -> list[_ChunkLayout]:
        """Every chunk's layouts for a micro-batch whose first-stage input is ``first_input`` (a meta pass)."""
        layouts = []
        x = to_meta(first_input)
        last = len(self.chunk_meshes) - 1
        for c, (stage, mesh) in enumerate(zip(self.pipeline.stages, self.chunk_meshes, strict=True)):
            where = f"stage {c}"
            tp_axis = None if stage.column_parallel is None else mesh.ndim - 1
            inputs, axes = input_layout(x, stage.input_spec, mesh, samples, where, tp_axis)
            outputs = None
            if c < last:
                try:
                    with torch.no_grad():
                        x = self._meta_forward(c, x, device)
                except Exception as error:
                    raise ValueError(f"{where} cannot take its input {_describe(x)} (run on meta tensors to "
                                     f"learn its output layout): {error}") from error
                outputs = output_layout(x, mesh, axes, samples, where, tp_axis)
            layouts.append(_ChunkLayout(inputs, outputs, axes))
        return layouts

    def _make_boundaries(self, layouts: list[_ChunkLayout], device: torch.device) -> tuple[list[_Boundary], int]:
        """Forward and backward plans of every chunk boundary; groups made in one order on all ranks.

        An ``auto`` executor or sender mode is chosen here, per boundary tensor and direction, by
        timing the candidates on that direction's lane (``resharding/auto.py``; collective).
        """
        boundaries, span = [], 1
        meshes = self.chunk_meshes
        for c in range(len(meshes) - 1):
            sent, received = layouts[c].outputs, layouts[c + 1].inputs
            if meshes[c] is meshes[c + 1]:
                self._check_local_boundary(c, sent, received)
                boundaries.append(_Boundary([], [], [], local=True))
                continue
            forward, backward, offsets, offset = [], [], [], 0
            ahead, back_lane = self._lane(_FORWARD, self._parts[c]), self._lane(_BACKWARD, self._parts[c])
            for (_, src), (_, dst) in zip(sent.tensors, received.tensors, strict=True):
                plan = self._plan(src.shape, src.dtype, meshes[c], src.spec, meshes[c + 1], dst.spec, ahead, device)
                back = self._plan(src.shape, src.dtype, meshes[c + 1], dst.spec, meshes[c], src.spec, back_lane,
                                  device) if src.differentiable else None
                self._groups[ahead].ensure(plan.groups())
                if back is not None:
                    self._groups[back_lane].ensure(back.groups())
                forward.append(plan)
                backward.append(back)
                offsets.append(offset)
                offset += max(len(plan.ops), len(back.ops) if back is not None else 0) + 1
            boundaries.append(_Boundary(forward, backward, offsets, self._parts[c]))
            span = max(span, offset)
        return boundaries, span

    def _check_local_boundary(self, c: int, sent: Layout, received: Layout) -> None:
        """Chunks ``c`` and ``c + 1`` share a mesh: every rank must already hold the part it needs."""
        mesh = self.chunk_meshes[c]
        for (_, src), (_, dst) in zip(sent.tensors, received.tensors, strict=True):
            same = src.shape == dst.shape and src.dtype == dst.dtype and all(
                local_box(mesh, src.spec, src.shape, r) == local_box(mesh, dst.spec, dst.shape, r) for r in mesh.ranks)
            if not same:
                raise ValueError(f"stages {c} and {c + 1} both run on stage mesh {self.meshes.index(mesh)} (the turn "
                                 f"of schedule {self.schedule!r}'s V), where nothing is resharded: stage {c + 1}'s "
                                 f"input_spec must leave every rank the part of leaf {src.path or '(the output)'} "
                                 f"that stage {c}'s output gives it ({src.spec} of {src.shape} {src.dtype}), got "
                                 f"{dst.spec} of {dst.shape} {dst.dtype}")

    def _plan(self, shape: tuple[int, ...], dtype: torch.dtype, src_mesh: Mesh, src_spec: Any, dst_mesh: Mesh,
              dst_spec: Any, lane: int, device: torch.device) -> ReshardPlan:
        return resolve_plan(shape, dtype, src_mesh, src_spec, dst_mesh, dst_spec, self.executor, self.sender_mode,
                            groups=self._groups[lane], shm=self._shm[lane], device=device)

    @staticmethod
    def _lane(direction: int, part: int) -> int:
        """Transfer lane: its own outbox thread, process groups and arenas (see ``outbox.py``)."""
        return 2 * part + direction

    def transports(self) -> set[tuple[str, int, int, str]]:
        """``(direction, from rank, to rank, "shm" or "dist")`` of every chunk boundary planned so far.

        Which transport moves activations (``forward``) and gradients (``backward``) between which
        ranks, as decided by :func:`transport_pairs`; plans exist after the first :meth:`step`.
        """
        pairs = set()
        for boundaries, _ in self._plans.values():
            for boundary in boundaries:
                for name, direction, plans in (("forward", _FORWARD, boundary.forward),
                                               ("backward", _BACKWARD, boundary.backward)):
                    for plan in plans:
                        if plan is not None:
                            shm = self._shm[self._lane(direction, boundary.part)]
                            pairs |= {(name, *pair) for pair in transport_pairs(plan, shm)}
        return pairs

    # -- transfers --------------------------------------------------------------------------------------

    def _tag(self, microbatch: int, direction: int, boundary: int, span: int) -> int:
        return ((microbatch * 2 + direction) * len(self.chunk_meshes) + boundary) * span

    def _send(self, direction: int, boundary: _Boundary, tensors: Sequence[torch.Tensor], base: int) -> None:
        if boundary.local:
            self._handed[(direction, base)] = list(tensors)
            return
        plans = boundary.forward if direction == _FORWARD else [p for p in boundary.backward if p is not None]
        offsets = boundary.offsets if direction == _FORWARD else [
            o for o, p in zip(boundary.offsets, boundary.backward, strict=True) if p is not None]
        for plan, tensor, offset in zip(plans, tensors, offsets, strict=True):
            self._outboxes[self._lane(direction, boundary.part)].put(plan, tensor, base + offset)

    def _receive(self, direction: int, boundary: _Boundary, base: int) -> list[torch.Tensor]:
        if boundary.local:
            return self._handed.pop((direction, base))
        lane = self._lane(direction, boundary.part)
        pairs = zip(boundary.forward, boundary.offsets, strict=True) if direction == _FORWARD else [
            (p, o) for p, o in zip(boundary.backward, boundary.offsets, strict=True) if p is not None]
        return [start_plan(plan, self.rank, None, self._groups[lane], base + offset, self._shm[lane]).wait()
                for plan, offset in pairs]

    def _chunk_input(self, c: int, m: int, first_input: Any, layouts: list[_ChunkLayout], boundaries: list[_Boundary],
                     span: int, grad: bool) -> tuple[Any, list[torch.Tensor]]:
        """Chunk ``c``'s input for micro-batch ``m`` (cut locally or received) and its differentiable leaves."""
        mesh = self.chunk_meshes[c]
        if c == 0:
            return layouts[0].inputs.local(first_input, mesh, self.rank), []
        tensors = self._receive(_FORWARD, boundaries[c - 1], self._tag(m, _FORWARD, c - 1, span))
        wanting = []
        for (_, leaf), tensor in zip(layouts[c].inputs.tensors, tensors, strict=True):
            if grad and leaf.differentiable:
                wanting.append(tensor.requires_grad_(True))
        return layouts[c].inputs.assemble(tensors), wanting

    def _firsts(self, micro: list[Any], counts: list[int],
                context: Callable[[], AbstractContextManager[Any]]) -> tuple[list[Any], list[Hashable]]:
        """Every micro-batch's first-stage input and layout key, in micro-batch order on every rank.

        Under the forward context, so a split model is traced and every stage's output dtype is
        learnt under the autocast its forwards run under.
        """
        firsts, keys = [], []
        for mb, samples in zip(micro, counts, strict=True):
            with context():
                firsts.append(self.pipeline.inputs(mb))
                keys.append(self._prepare(firsts[-1], samples))
        return firsts, keys

    # -- training ---------------------------------------------------------------------------------------

    def step(self, batch: Any) -> torch.Tensor:
        """Forward and backward of every micro-batch; gradients accumulate in the rank's chunks' parameters.

        Each micro-batch's loss is weighted by its share of the batch's samples. Returns the
        full-batch loss on every rank (detached). An exception in a forward, loss or backward on any
        rank raises :class:`PipelineStepError` on every rank after the schedule (see :meth:`_settle`).
        """
        micro, counts = split_microbatches(batch, self.num_microbatches)
        total = sum(counts)
        firsts, keys = self._firsts(micro, counts, self._forward_context)
        device = _device_of(firsts[0])
        last = len(self.chunk_meshes) - 1
        held: dict[tuple[int, int], tuple[list[torch.Tensor], Any, list | None]] = {}  # outputs or weight pass
        loss_sum = torch.zeros((), dtype=torch.float64)
        failure: _Failure | None = None
        for index, action in enumerate(self._order):
            c, m = action.chunk, action.microbatch
            layouts = self._layouts[keys[m]]
            boundaries, span = self._plans[keys[m]]
            if action.kind == "F":
                x, wanting = self._chunk_input(c, m, firsts[m], layouts, boundaries, span, grad=True)
                sent = None
                if failure is None:
                    try:
                        sent, outs, loss = self._forward(c, x, micro[m], counts[m], total, layouts)
                        held[(c, m)] = (wanting, outs, [] if loss is None or c < last else [None])
                        if loss is not None:
                            loss_sum += loss.detach().double()
                    except Exception as error:  # noqa: BLE001 - raised on every rank by _settle
                        failure = _Failure(self.rank, action, error)
                if failure is not None:  # the schedule's transfers go on, with zeros and no graph
                    held[(c, m)] = (wanting, None, None)
                if c < last:
                    if sent is None:
                        sent = layouts[c].outputs.zeros(self.chunk_meshes[c], self.rank, device)
                    self._send(_FORWARD, boundaries[c], sent, self._tag(m, _FORWARD, c, span))
            elif action.kind == "B":
                split = self._split_backward and not action.fused  # a fused B runs its W too
                wanting, outs, grads = held[(c, m)]
                if c < last:
                    grads = self._receive(_BACKWARD, boundaries[c], self._tag(m, _BACKWARD, c, span))
                x_grads = None
                if failure is None and outs is not None:
                    try:
                        x_grads = self._backward(c, m, held, outs, grads, split)
                    except Exception as error:  # noqa: BLE001 - raised on every rank by _settle
                        failure = _Failure(self.rank, action, error)
                if x_grads is None:
                    held[(c, m)] = (wanting, None, None)
                    if not split:
                        del held[(c, m)]
                    x_grads = [torch.zeros_like(x) for x in wanting]
                if c > 0:
                    self._send(_BACKWARD, boundaries[c - 1], x_grads, self._tag(m, _BACKWARD, c - 1, span))
            elif not self._order[index - 1].fused:  # else this W ran with the fused B before it
                _, weight, _ = held.pop((c, m))
                if failure is None and isinstance(weight, WeightPass):
                    try:
                        weight.run()
                    except Exception as error:  # noqa: BLE001 - raised on every rank by _settle
                        failure = _Failure(self.rank, action, error)
        for outbox in self._outboxes:
            outbox.flush()
        layouts = self._layouts[keys[0]]
        if last in self.chunks:
            loss_sum /= self._replication(self.chunk_meshes[last], layouts[last].batch_axes)
        else:
            loss_sum.zero_()
        self._settle(failure, loss_sum)
        self._reduce_stage_gradients(layouts)
        self._tied.reduce()
        return loss_sum.float()

    def _forward(self, c: int, x: Any, microbatch: Any, samples: int, total: int,
                 layouts: list[_ChunkLayout]) -> tuple[list[torch.Tensor] | None, list[torch.Tensor], Any]:
        """Chunk ``c`` on its input: (detached tensors to send, differentiable outputs, weighted loss or None)."""
        last = len(self.chunk_meshes) - 1
        with self._forward_context():
            y = self.pipeline.stages[c].module(x)
            loss = None if c < last else self._loss(y, microbatch, samples, total, layouts[c].batch_axes)
        if c == last:
            return None, [] if loss is None else [loss], loss
        sent = layouts[c].outputs.check(y, self.chunk_meshes[c], self.rank, f"stage {c} output")
        outs = [t for (_, leaf), t in zip(layouts[c].outputs.tensors, sent, strict=True) if leaf.differentiable]
        return [t.detach() for t in sent], outs, None

    def _settle(self, failure: _Failure | None, loss: torch.Tensor | None = None) -> None:
        """Collective: sum ``loss`` over the world (in place) and raise on every rank what failed on any.

        A rank whose forward, loss or backward raised went on with the schedule's transfers (zeros),
        so no rank waits on it; one all-reduce carries a failure flag beside the loss, and only when
        it is set do the ranks exchange what failed where.
        """
        packed = torch.zeros(2, dtype=torch.float64)
        packed[0] = 0.0 if loss is None else loss
        packed[1] = float(failure is not None)
        dist.all_reduce(packed)
        if loss is not None:
            loss.copy_(packed[0])
        if packed[1] == 0:
            return
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, None if failure is None else failure.describe())
        found = sorted(part for part in parts if part is not None)
        text = "; also ".join(message for _, message in found)
        raise PipelineStepError(f"the pipelined step failed on {text}") from (None if failure is None else
                                                                              failure.error)

    def _loss(self, output: Any, microbatch: Any, samples: int, total: int,
              batch_axes: tuple[int, ...]) -> torch.Tensor | None:
        """The loss of this rank's samples of a micro-batch, weighted by their share of the batch."""
        start, stop = rows_of(self.chunk_meshes[-1], batch_axes, samples, self.rank)
        if stop <= start:
            return None
        target = self.pipeline.target(take_rows(microbatch, start, stop))
        loss = self.pipeline.loss(output, target)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise ValueError(f"the loss must be a scalar tensor (a mean over the micro-batch's samples), got "
                             f"{_describe(loss)}")
        return loss * ((stop - start) / total)

    def _backward(self, c: int, m: int, held: dict, outs: list[torch.Tensor],
                  grads: list[torch.Tensor | None], split: bool) -> list[torch.Tensor]:
        """The input gradients of chunk ``c`` for micro-batch ``m`` (the weights' too unless ``split``)."""
        wanting = held[(c, m)][0]
        if c < len(self.chunk_meshes) - 1:
            pairs = [(y, g) for y, g in zip(outs, grads, strict=True) if y.requires_grad]
            outs, grads = [y for y, _ in pairs], [g for _, g in pairs]
        elif outs and not outs[0].requires_grad:
            outs, grads = [], []
        if split:
            params = [p for p in self.pipeline.stages[c].module.parameters() if p.requires_grad]
            x_grads, weight = input_gradient(wanting, outs, grads, params)
            held[(c, m)] = (wanting, weight, None)  # the graph now lives in the weight pass
            return x_grads
        del held[(c, m)]
        if outs:
            torch.autograd.backward(outs, grads)
        return [torch.zeros_like(x) if x.grad is None else x.grad for x in wanting]

    # -- evaluation -------------------------------------------------------------------------------------

    def evaluate(self, batch: Any, fn: Callable[[Any, Any], Any],
                 forward_context: Callable[[], AbstractContextManager[Any]] | None = None,
                 ) -> list[tuple[int, int, int, Any]]:
        """Forward-only pipeline over the batch's micro-batches (no gradients, each rank runs its chunks).

        ``forward_context`` (default: the training one) is entered around every forward and ``fn``. On
        ranks of the last stage, ``fn(output, micro-batch rows)`` runs on each micro-batch's output;
        returns ``(micro-batch, first sample, end sample, result)`` per call, the samples counted in the
        whole batch (an empty list elsewhere). Uses up to ``num_microbatches`` micro-batches.
        """
        micro, counts = split_microbatches(batch, min(self.num_microbatches, sample_count(batch)))
        context = forward_context or self._forward_context
        firsts, keys = self._firsts(micro, counts, context)
        last = len(self.chunk_meshes) - 1
        results = []
        offset = 0
        starts = []
        for samples in counts:
            starts.append(offset)
            offset += samples
        device = _device_of(firsts[0])
        failure: _Failure | None = None
        with torch.no_grad():
            for m in range(len(micro)):
                layouts = self._layouts[keys[m]]
                boundaries, span = self._plans[keys[m]]
                for c in self.chunks:
                    x, _ = self._chunk_input(c, m, firsts[m], layouts, boundaries, span, grad=False)
                    sent = None
                    if failure is None:
                        try:
                            with context():
                                y = self.pipeline.stages[c].module(x)
                                if c == last:
                                    start, stop = rows_of(self.chunk_meshes[c], layouts[c].batch_axes, counts[m],
                                                          self.rank)
                                    if stop > start:
                                        result = fn(y, take_rows(micro[m], start, stop))
                                        results.append((m, starts[m] + start, starts[m] + stop, result))
                            if c < last:
                                sent = layouts[c].outputs.check(y, self.chunk_meshes[c], self.rank,
                                                                f"stage {c} output")
                            del x, y  # one micro-batch's output at a time: the last stage's logits are the largest
                        except Exception as error:  # noqa: BLE001 - raised on every rank by _settle
                            failure = _Failure(self.rank, Action("F", m, c), error)
                    if c < last:
                        if sent is None:
                            sent = layouts[c].outputs.zeros(self.chunk_meshes[c], self.rank, device)
                        self._send(_FORWARD, boundaries[c], sent, self._tag(m, _FORWARD, c, span))
        for outbox in self._outboxes[_FORWARD::2]:
            outbox.flush()
        self._settle(failure)
        return results

    def contributes(self) -> bool:
        """Whether this rank's last-stage results count (the first replica of each sample block)."""
        last = len(self.chunk_meshes) - 1
        if last not in self.chunks or not self._layouts:
            return False
        axes = next(iter(self._layouts.values()))[last].batch_axes
        mesh = self.chunk_meshes[last]
        return all(x == 0 for axis, x in enumerate(mesh.coordinate(self.rank)) if axis not in axes)

    # -- gradients and parameters -----------------------------------------------------------------------

    @staticmethod
    def _replication(mesh: Mesh, batch_axes: tuple[int, ...]) -> int:
        """How many ranks of a stage mesh hold the same samples."""
        parts = 1
        for axis in batch_axes:
            parts *= mesh.shape[axis]
        return mesh.size // parts

    def _reduce_stage_gradients(self, layouts: list[_ChunkLayout]) -> None:
        """Data parallel inside the stage mesh: sum sample-weighted gradients, undo replica double counting."""
        mesh = self.meshes[self.stage]
        if mesh.size == 1:
            return
        replication: dict[int, int] = {}
        params: dict[int, tuple[int, torch.Tensor]] = {}
        for c in self.chunks:
            for p in self.pipeline.stages[c].module.parameters():
                if p.grad is None:
                    continue
                factor = self._replication(mesh, layouts[c].batch_axes)
                if replication.setdefault(id(p), factor) != factor:
                    raise ValueError(f"a parameter of stage {c} is shared with another stage on the same mesh whose "
                                     "samples are spread differently; give both stages the same input_spec")
                params.setdefault(id(p), (c, p))
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for _, p in params.values()])
        dist.all_reduce(flat, group=self._stage_groups[self.stage])
        tensor_parallel = {id(p) for c in self.chunks for p in self._column_parallel_params(c)}
        offset = 0
        for key, (c, p) in params.items():
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad)).div_(replication[key])
            if id(p) in tensor_parallel:  # each row block came from the ranks of one TP slice only
                p.grad.mul_(self._tp_parts[c])
            offset += p.numel()

    def _column_parallel_params(self, stage: int) -> list[torch.Tensor]:
        name = self.pipeline.stages[stage].column_parallel
        if name is None:
            return []
        linear = find_linear(self.pipeline.stages[stage].module, name)
        return [p for p in (linear.weight, linear.bias) if p is not None]

    def close(self) -> None:
        for outbox in self._outboxes:
            outbox.close()
        for arenas in self._shm:
            if arenas is not None:
                arenas.close()


class PipelineStepError(RuntimeError):
    """A forward, loss or backward raised on some rank; raised on every rank, naming each failing rank."""


@dataclass(frozen=True)
class _Failure:
    """The first exception a rank met in a step, and where (its position orders failures across ranks)."""

    rank: int
    action: Action
    error: Exception

    def describe(self) -> tuple[tuple[int, int, int, int], str]:
        kind = {"F": "forward", "B": "backward", "W": "weight gradient"}[self.action.kind]
        where = (f"rank {self.rank} (stage {self.action.chunk}, {kind} of micro-batch {self.action.microbatch}): "
                 f"{type(self.error).__name__}: {self.error}")
        phase = "FBW".index(self.action.kind)
        chunk = self.action.chunk if self.action.kind == "F" else -self.action.chunk
        return (self.action.microbatch, phase, chunk, self.rank), where


def _device_of(tree: Any) -> torch.device:
    """The device of a pytree's first tensor (CPU without one)."""
    tensors = [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]
    return tensors[0].device if tensors else torch.device("cpu")


def _describe(tree: Any) -> str:
    """A short text of a pytree's structure with tensor shapes (for error messages)."""
    leaves, spec = tree_flatten(tree)
    shown = [f"{tuple(leaf.shape)} {leaf.dtype}" if isinstance(leaf, torch.Tensor) else repr(leaf) for leaf in leaves]
    return f"{spec} with leaves [{', '.join(shown)}]"

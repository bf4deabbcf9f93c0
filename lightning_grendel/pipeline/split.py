"""Automatic stage splits: torch's own tracer cuts an unmodified model before named submodules.

``torch.distributed.pipelining.pipeline`` (``torch.export`` underneath) traces the model's forward on
example inputs and splits the graph before each split point. Export specialises shapes and
train/eval behaviour (dropout, the fast paths of ``nn.Transformer``), so the model is traced once per
input signature, mode and autocast state, each trace checked against the eager forward on its example
inputs.
Data-dependent checks the tracer cannot see through (``nn.Transformer``'s test whether a mask is
causal) are decided on the example's real values (``fake_tensor_propagate_real_tensors``) and stay in
the graph as runtime assertions, so an input that would take the other branch is an error, never a
silently wrong branch; the check against the eager output catches a trace that does not hold.

A later stage may need a model input or an early activation (the demo transformer's decoder takes
the target embedding made in stage 0): every boundary carries each value some later stage uses, so
stages only ever talk to their neighbours. Stage inputs and outputs are ``(key, *tensors)``, where
``key`` names the trace. Tied weights, which torch's splitter copies per stage, are put back to the
model's one parameter, so optimisers and checkpoints see the model's own tensors.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from lightning_grendel.pipeline.pytree import signature

_CONSTANTS = (type(None), bool, int, float, str)


class _Flat(nn.Module):
    """The root module called with its tensor arguments only, returning its output's tensors only."""

    def __init__(self, root: nn.Module, in_spec: Any, in_leaves: list[Any]) -> None:
        super().__init__()
        self.module = root
        self._in_spec = in_spec
        self._constants = [(isinstance(leaf, torch.Tensor), None if isinstance(leaf, torch.Tensor) else leaf)
                           for leaf in in_leaves]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        given = iter(tensors)
        leaves = [next(given) if is_tensor else value for is_tensor, value in self._constants]
        args, kwargs = self._in_spec.unflatten(leaves)
        return tuple(leaf for leaf in tree_flatten(self.module(*args, **kwargs))[0] if isinstance(leaf, torch.Tensor))


@dataclass
class _StageGraph:
    """One stage of one trace: its graph module and which values it takes, makes and passes on."""

    module: fx.GraphModule
    takes: list[fx.Node]
    call: fx.Node
    makes: list[fx.Node]
    passes: list[fx.Node]
    shapes: list[tuple[tuple[int, ...], torch.dtype]]


@dataclass
class _Trace:
    key: str
    out_spec: Any
    out_leaves: list[Any]


class TracedStage(nn.Module):
    """A stage of an automatically split model: input and output ``(key, *tensors)`` (the last stage
    returns the model's output). Holds the model's own parameters and buffers of the stage."""

    def __init__(self, index: int, last: bool) -> None:
        super().__init__()
        self.index, self.last = index, last
        self.weights = nn.ParameterList()
        self._graphs: dict[str, _StageGraph] = {}
        self._traces: dict[str, _Trace] = {}

    def _adopt(self, params: list[nn.Parameter], buffers: list[torch.Tensor]) -> None:
        """Register the stage's parameters and buffers (the model's tensors) at the first trace."""
        if len(self.weights) == 0 and not list(self.buffers()):
            self.weights.extend(params)
            for i, buffer in enumerate(buffers):
                self.register_buffer(f"buffer{i}", buffer)
            return
        if {id(p) for p in params} != {id(p) for p in self.weights}:
            raise RuntimeError(f"stage {self.index}: a new trace put other parameters in this stage")

    def forward(self, x: tuple) -> Any:
        key, *values = x
        graph = self._graphs[key]
        env = dict(zip(graph.takes, values, strict=True))
        try:
            out = graph.module(*(env[a] for a in graph.call.args))
        except RuntimeError as error:
            if "Runtime assertion failed" not in str(error):
                raise
            raise ValueError(f"stage {self.index}: this input takes another branch of the model's data-dependent "
                             "control flow than the example it was traced on; cut the model by hand with "
                             "pipeline_stages()") from error
        env[graph.call] = out
        for node in graph.makes:
            env[node] = out[node.args[1]]
        if not self.last:
            return (key, *(env[node] for node in graph.passes))
        trace = self._traces[key]
        given = iter(env[node] for node in graph.passes)
        return trace.out_spec.unflatten([next(given) if isinstance(leaf, torch.Tensor) else leaf
                                         for leaf in trace.out_leaves])

    def meta(self, x: tuple) -> tuple:
        """The output on meta tensors, from the shapes recorded when the trace was checked."""
        key = x[0]
        return (key, *(torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in self._graphs[key].shapes))


class TracedPipeline:
    """Splits ``root`` before each of ``split_points`` (submodule names) into ``len(split_points) + 1`` stages.

    :meth:`stage_input` turns the arguments of one forward call into the first stage's input, tracing
    the model for an input signature (and train/eval mode) it has not seen: call it in the same order
    on every rank, so every rank holds the same traces. A trace runs the whole model: ``whole_model``
    is entered around it (where ranks hold only their stages' weights, it gives them all back).
    """

    def __init__(self, root: nn.Module, split_points: Sequence[str],
                 whole_model: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext) -> None:
        names = [name for name, _ in root.named_modules() if name]
        for point in split_points:
            if point not in names:
                close = difflib.get_close_matches(point, names, n=3, cutoff=0.5)
                raise ValueError(f"split point {point!r} names no submodule of {type(root).__name__}"
                                 + (f"; did you mean {close}?" if close else ""))
        if len(set(split_points)) != len(split_points) or not split_points:
            raise ValueError(f"split_points must name distinct submodules, at least one, got {list(split_points)}")
        self.root, self.split_points, self.whole_model = root, list(split_points), whole_model
        count = len(split_points) + 1
        self.stages = [TracedStage(i, i == count - 1) for i in range(count)]
        self._keys: dict[Hashable, str] = {}

    def stage_input(self, args: tuple, kwargs: dict) -> tuple:
        """``(key, *tensors)`` for the first stage: the call's tensors, under the key of its trace."""
        leaves, spec = tree_flatten((args, kwargs))
        autocast = tuple((device, torch.get_autocast_dtype(device)) for device in ("cpu", "cuda")
                         if torch.is_autocast_enabled(device))
        sig = (self.root.training, autocast, signature((args, kwargs)))
        if sig not in self._keys:
            key = f"{'train' if self.root.training else 'eval'}{len(self._keys)}"
            self._trace(key, spec, leaves)
            self._keys[sig] = key
        return (self._keys[sig], *(leaf for leaf in leaves if isinstance(leaf, torch.Tensor)))

    def _trace(self, key: str, in_spec: Any, in_leaves: list[Any]) -> None:
        from torch._functorch import config as functorch_config
        from torch.distributed.pipelining import SplitPoint, pipeline

        tensors = tuple(leaf for leaf in in_leaves if isinstance(leaf, torch.Tensor))
        args, kwargs = in_spec.unflatten(in_leaves)
        devices = [tensors[0].device.index or 0] if tensors and tensors[0].is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode(False), self.whole_model():
            # the check replays the eager forward's random draws: dropout must not look like a wrong trace
            start = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]
            order, eager = self._eager(args, kwargs)
            out_leaves, out_spec = tree_flatten(eager)
            for leaf in out_leaves:
                if not isinstance(leaf, (torch.Tensor, *_CONSTANTS)):
                    raise ValueError(f"forward returned a {type(leaf).__name__}; a split model's stages pass tensors "
                                     "(and constants): return tensors (e.g. use_cache=False for transformers models)")
            flat = _Flat(self.root, in_spec, in_leaves)
            spec = {f"module.{point}": SplitPoint.BEGINNING for point in order}
            try:
                with functorch_config.patch(fake_tensor_propagate_real_tensors=True):
                    pipe = pipeline(flat, tensors, split_spec=spec)
            except RuntimeError as error:
                cause = error.__cause__ or error
                raise ValueError(f"torch's tracer cannot capture {type(self.root).__name__}.forward as one graph "
                                 f"({cause}); cut the model by hand with pipeline_stages()") from error
            finally:
                for point in order:
                    module = self.root.get_submodule(point)
                    for attribute in ("forward", "_orig_forward"):
                        module.__dict__.pop(attribute, None)
            if pipe.num_stages != len(self.stages):
                raise ValueError(f"torch's tracer cut the model into {pipe.num_stages} stages, not "
                                 f"{len(self.stages)}: a split point right at the start of forward makes an empty "
                                 f"stage (split points in call order: {order})")
            self._register(key, pipe.split_gm, out_spec, out_leaves)
            torch.set_rng_state(start[0])
            for device, state in zip(devices, start[1], strict=True):
                torch.cuda.set_rng_state(state, device)
            self._check(key, tensors, [leaf for leaf in out_leaves if isinstance(leaf, torch.Tensor)])

    def _eager(self, args: tuple, kwargs: dict) -> tuple[list[str], Any]:
        """An eager forward (it also sets attributes a forward makes lazily, before the tracer runs): the
        split points in the order it calls them (each exactly once) and its output."""
        calls: list[str] = []
        handles = [self.root.get_submodule(point).register_forward_pre_hook(
            lambda module, inputs, point=point: calls.append(point)) for point in self.split_points]
        try:
            with torch.no_grad():
                output = self.root(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        for point in self.split_points:
            if calls.count(point) != 1:
                raise ValueError(f"split point {point!r} is called {calls.count(point)} times by forward; a split "
                                 "point must be a submodule forward calls exactly once")
        return calls, output

    def _register(self, key: str, split_gm: fx.GraphModule, out_spec: Any, out_leaves: list[Any]) -> None:
        nodes = list(split_gm.graph.nodes)
        position = {node: i for i, node in enumerate(nodes)}
        placeholders = [n for n in nodes if n.op == "placeholder"]
        calls = [n for n in nodes if n.op == "call_module"]
        (output,) = [n for n in nodes if n.op == "output"]
        final = [leaf for leaf in tree_flatten(output.args[0])[0] if isinstance(leaf, fx.Node)]
        made_by = {node: -1 for node in placeholders}
        for s, call in enumerate(calls):
            made_by[call] = s
            for user in call.users:
                made_by[user] = s
        needed = [{a for a in call.args if isinstance(a, fx.Node)} for call in calls]
        takes = placeholders
        for s, call in enumerate(calls):
            module = split_gm.get_submodule(call.target)
            self._retie(module)
            later = set(final).union(*needed[s + 1:]) if s + 1 < len(calls) else set(final)
            passes = sorted((n for n in later if made_by[n] <= s), key=position.__getitem__)
            makes = [user for user in call.users if user.op == "call_function"]
            stage = self.stages[s]
            stage._graphs[key] = _StageGraph(module, takes, call, makes, passes if s + 1 < len(calls) else final, [])
            stage._traces[key] = _Trace(key, out_spec, out_leaves)
            params = list(dict.fromkeys(module.parameters()))
            mine = {id(b) for b in self.root.buffers()}
            stage._adopt(params, [b for b in dict.fromkeys(module.buffers()) if id(b) in mine])
            takes = passes

    def _retie(self, module: nn.Module) -> None:
        """Point the stage's parameters and buffers back at the model's (the splitter copies tied ones)."""
        for name, _ in list(module.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner), leaf, self.root.get_parameter(name.removeprefix("module.")))
        for name, _ in list(module.named_buffers()):
            original = _buffer(self.root, name.removeprefix("module."))
            if original is not None:
                owner, _, leaf = name.rpartition(".")
                module.get_submodule(owner)._buffers[leaf] = original

    def _check(self, key: str, tensors: tuple, eager: list[torch.Tensor]) -> None:
        """Run the split stages on the example: record boundary shapes, compare with the eager forward."""
        x: Any = (key, *tensors)
        with torch.no_grad():
            for stage in self.stages:
                x = stage(x)
                if not stage.last:
                    stage._graphs[key].shapes = [(tuple(t.shape), t.dtype) for t in x[1:]]
        got = [leaf for leaf in tree_flatten(x)[0] if isinstance(leaf, torch.Tensor)]
        for i, (a, b) in enumerate(zip(got, eager, strict=True)):
            if a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5):
                raise ValueError(f"the split model's output {i} differs from the eager forward on the same input "
                                 "(data-dependent control flow the trace fixed?); split it by hand with "
                                 "pipeline_stages()")


def _buffer(root: nn.Module, name: str) -> torch.Tensor | None:
    owner, _, leaf = name.rpartition(".")
    with contextlib.suppress(AttributeError):
        return root.get_submodule(owner)._buffers.get(leaf)
    return None

"""A LightningModule's own steps run inside a pipeline (Lightning glue: the runtime sees plain callables).

Per micro-batch the module's ``training_step`` (or ``validation_step``, ``test_step``,
``predict_step``) runs with ``self.forward`` patched:

- capture, on every rank: forward records its arguments and stops the step. They are the first
  stage's input (and the tracer's example inputs); every rank captures, so every rank plans alike.
- replay, on the last stage: forward returns the pipeline's output for the micro-batch, so the step
  computes its loss, its extra terms and its ``self.log`` calls as written, on this rank's samples.

Logged values and returned tensors are combined over micro-batches by their share of the batch's
samples (``reduce_fx="mean"``; ``sum``, ``max`` and ``min`` as named), gathered from the last stage
to every rank and logged once per step with the same value everywhere: rank 0, where
``ModelCheckpoint`` and ``EarlyStopping`` decide, is usually stage 0. That value is the whole batch's,
so ``sync_dist=True`` in a step changes nothing (outside the steps Lightning reduces over all ranks).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from torch.utils._pytree import tree_flatten

from lightning_grendel.pipeline.pytree import sample_count
from lightning_grendel.pipeline.split import TracedPipeline

_LOG_SIGNATURE = inspect.signature(LightningModule.log)
_REDUCTIONS = {"mean": "mean", "sum": "sum", "max": "max", "min": "min", torch.mean: "mean", torch.sum: "sum",
               torch.max: "max", torch.min: "min"}


class _Captured(BaseException):  # not an Exception: a step's own ``except Exception`` must not swallow it
    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.call = (args, kwargs)


@contextlib.contextmanager
def _patched(module: LightningModule, **attributes: Any) -> Iterator[None]:
    """Set instance attributes (``forward``, ``log``) for the duration of one step, then put back what was there."""
    saved = {name: module.__dict__[name] for name in attributes if name in module.__dict__}
    module.__dict__.update(attributes)
    try:
        yield
    finally:
        for name in attributes:
            module.__dict__.pop(name, None)
        module.__dict__.update(saved)


def _scalar(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach().float())
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"self.log({name!r}, ...) got a {type(value).__name__}; under PipelineStrategy the step runs per "
                     "micro-batch on the last stage, so log scalar tensors or numbers (compute a torchmetrics Metric "
                     "yourself and log its value)")


class Combined:
    """Per name: the reduction, the value so far and the ``self.log`` keyword arguments."""

    def __init__(self) -> None:
        self.values: dict[str, list[Any]] = {}

    def add(self, name: str, value: Any, share: float, reduce: Any = "mean", kwargs: dict | None = None) -> None:
        kind = _REDUCTIONS.get(reduce)
        if kind is None:
            raise ValueError(f"self.log({name!r}, reduce_fx={reduce!r}): PipelineStrategy combines micro-batches with "
                             "'mean', 'sum', 'max' or 'min' only")
        number = _scalar(name, value)
        if name not in self.values:
            self.values[name] = [kind, None, kwargs or {}]
        entry = self.values[name]
        entry[1] = _merge(kind, entry[1], number * share if kind == "mean" else number)

    def merge(self, other: Combined) -> None:
        for name, (kind, value, kwargs) in other.values.items():
            if name not in self.values:
                self.values[name] = [kind, None, kwargs]
            self.values[name][1] = _merge(kind, self.values[name][1], value)


def _merge(kind: str, a: float | None, b: float) -> float:
    if a is None:
        return b
    return {"mean": a + b, "sum": a + b, "max": max(a, b), "min": min(a, b)}[kind]


class ModuleSteps:
    """The first-stage input and the loss (or evaluation result) of a micro-batch, from the module's steps.

    ``traced``: the model is split automatically (the first stage gets the traced forward's tensors);
    else ``inputs`` gives the explicit first stage's input and the captured forward arguments must be
    exactly that, so an explicit pipeline computes what the step's forward call would. With
    ``legacy_loss`` the pipeline has its own loss and ``training_step`` is not run.
    """

    def __init__(self, module: LightningModule, traced: TracedPipeline | None, inputs: Callable[[Any], Any] | None,
                 legacy_loss: bool = False) -> None:
        self.module, self.traced, self.inputs, self.legacy_loss = module, traced, inputs, legacy_loss
        self.step, self.args, self.total = "training_step", (), 1
        self.logs, self.outputs, self.problems = Combined(), Combined(), []

    def begin(self, step: str, batch: Any, *args: Any) -> None:
        """Before a step: the hook to run per micro-batch, its other arguments (``batch_idx``...), the batch size."""
        self.step, self.args, self.total = step, args, sample_count(batch)
        self.logs, self.outputs, self.problems = Combined(), Combined(), []

    def capture(self, microbatch: Any) -> tuple[tuple, dict]:
        """The arguments the step passes to forward (the step stops there; its logs are dropped)."""
        def forward(*args: Any, **kwargs: Any) -> None:
            raise _Captured(args, kwargs)

        with _patched(self.module, forward=forward, log=lambda *a, **k: None):
            try:
                getattr(self.module, self.step)(microbatch, *self.args)
            except _Captured as captured:
                return captured.call
        raise ValueError(f"{type(self.module).__name__}.{self.step} never called forward (self(...)); under "
                         "PipelineStrategy the step must call forward exactly once, with the pipeline's input")

    def first_input(self, microbatch: Any) -> Any:
        """The first stage's input for one micro-batch (runs on every rank, in micro-batch order)."""
        if self.legacy_loss and self.step == "training_step":  # Pipeline.loss given: training_step is not run
            return self.inputs(microbatch)
        args, kwargs = self.capture(microbatch)
        if self.traced is not None:
            return self.traced.stage_input(args, kwargs)
        expected = self.inputs(microbatch)
        if not _same((args, kwargs), ((expected,), {})):
            raise ValueError(f"{type(self.module).__name__}.{self.step} calls forward with other arguments than the "
                             "first stage's input, Pipeline.inputs(batch); set Pipeline(inputs=...) to what the step "
                             "passes to forward (or use PipelineStrategy(split_points=...))")
        return expected

    def replay(self, output: Any, rows: Any) -> Any:
        """Run the step on this rank's samples of a micro-batch with forward returning the pipeline's ``output``."""
        calls = 0
        share = sample_count(rows) / self.total

        def forward(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            return output

        def log(*args: Any, **kwargs: Any) -> None:
            bound = _LOG_SIGNATURE.bind(self.module, *args, **kwargs)
            bound.apply_defaults()
            options = {k: v for k, v in bound.arguments.items() if k not in ("self", "name", "value")}
            self.logs.add(bound.arguments["name"], bound.arguments["value"], share, options["reduce_fx"], options)

        with _patched(self.module, forward=forward, log=log):
            result = getattr(self.module, self.step)(rows, *self.args)
        if calls != 1:  # raised on every rank after the step (check), not here on the last stage alone
            self.problems.append(f"{type(self.module).__name__}.{self.step} called forward {calls} times; under "
                                 "PipelineStrategy it must call it exactly once (the pipeline computes one forward)")
        return result

    def check(self, stray: list[str]) -> None:
        """Collective: raise on every rank what any rank found wrong with the step.

        ``stray``: parameters outside this rank's stages that got a gradient, i.e. a loss term on
        another stage's weights (an L2 penalty over all weights).
        """
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self.problems, stray))
        problems = [problem for part in parts for problem in part[0]]
        if problems:
            raise ValueError(problems[0])
        names = sorted({name for part in parts for name in part[1]})
        if names:
            raise ValueError(f"{type(self.module).__name__}.{self.step}'s loss depends on parameters that are not in "
                             f"the pipeline's last stage: {names[:5]} (an extra term such as an L2 penalty over all "
                             "weights?). Only the last stage runs the step: use the optimiser's weight_decay instead, "
                             "or keep extra terms to the last stage's parameters")

    def loss(self, output: Any, rows: Any) -> torch.Tensor:
        """The training step's loss on this rank's samples; its other returned tensors are kept for the step output."""
        result = self.replay(output, rows)
        if isinstance(result, dict):
            for key, value in result.items():
                if key != "loss":
                    self.outputs.add(key, value, sample_count(rows) / self.total)
            result = result.get("loss")
        if not isinstance(result, torch.Tensor):
            raise ValueError(f"{type(self.module).__name__}.training_step returned {type(result).__name__}; under "
                             "PipelineStrategy it must return the loss (a tensor, or a dict with 'loss')")
        return result

    def evaluate(self, output: Any, rows: Any) -> Any:
        """A validation/test/predict step on this rank's samples (its logs kept, its result returned)."""
        result = self.replay(output, rows)
        if self.step != "predict_step" and result is not None:
            for key, value in (result.items() if isinstance(result, dict) else [("", result)]):
                self.outputs.add(key, value, sample_count(rows) / self.total)
            return None
        return result

    def publish(self, contributes: bool) -> dict[str, Any] | torch.Tensor | None:
        """Gather what the last stage logged and returned, log it on every rank; the step's combined output."""
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self.logs, self.outputs) if contributes else None)
        logs, outputs = Combined(), Combined()
        for part in parts:
            if part is not None:
                logs.merge(part[0])
                outputs.merge(part[1])
        device = self.module.device
        for name, (_, value, options) in logs.values.items():
            # already the whole batch's value, the same on every rank: sync_dist would reduce it again ("sum"
            # would count it once per rank)
            self.module.log(name, torch.tensor(value, device=device), **{**options, "sync_dist": False})
        values = {name: torch.tensor(value, device=device) for name, (_, value, _) in outputs.values.items()}
        if list(values) == [""]:
            return values[""]
        return values or None


def _same(a: Any, b: Any) -> bool:
    """Same structure, same tensors (by value), same other leaves."""
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    if spec_a != spec_b:
        return False
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor) and not (x is y or (x.shape == y.shape and torch.equal(x, y))):
            return False
        if not isinstance(x, torch.Tensor) and x != y:
            return False
    return True


def gather_predictions(results: list[tuple[int, int, int, Any]], contributes: bool) -> Any:
    """Every rank gets the batch's prediction: the micro-batches' tensors concatenated in sample order."""
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, [(start, result) for _, start, _, result in results] if contributes else [])
    pieces = sorted((piece for part in parts for piece in part), key=lambda piece: piece[0])
    flat = [tree_flatten(result) for _, result in pieces]
    spec = flat[0][1]
    if any(s != spec for _, s in flat):
        raise ValueError("predict_step returned differently structured results for the micro-batches of one batch")
    leaves = []
    for column in zip(*(leaves for leaves, _ in flat), strict=True):
        if isinstance(column[0], torch.Tensor) and column[0].ndim > 0:
            leaves.append(torch.cat(column))
        elif all(_same(value, column[0]) for value in column):
            leaves.append(column[0])
        else:
            raise ValueError("predict_step returned a value that differs between micro-batches of one batch and is "
                             "not a tensor with the sample dim first; PipelineStrategy concatenates micro-batches")
    return spec.unflatten(leaves)

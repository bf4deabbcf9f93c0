"""What a pipeline is made of: its stages, the input layout each wants on its mesh, and the loss.

Batches are any pytree whose tensors share their first (sample) dim. ``Pipeline.inputs`` picks what
the first stage gets from a micro-batch (default ``batch[0]``) and ``Pipeline.target`` what the loss
gets besides the last stage's output (default ``batch[1]``; the identity gives it the whole
micro-batch, as torch pipelining's ``loss_fn(output, target)`` does). The loss must be a mean over the
micro-batch's samples: each micro-batch is weighted by its share of the batch's samples, counted from
the batch itself, so outputs of any shape (a flattened ``[B*T, V]``) add up to the full-batch loss.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

HOOK_NAME = "pipeline_stages"


@dataclass
class PipelineStage:
    """A module, called with one argument (its input pytree), and the layout it wants that input in.

    ``input_spec`` is a spec for every tensor leaf (``"R"`` replicated, ``"S1"``: samples over mesh axis
    1) or a pytree of specs shaped like the input; only the first (sample) dim may be sharded (data
    parallel inside the stage mesh). ``column_parallel`` names the stage's final ``nn.Linear``: it is
    then split over the last mesh axis (tensor parallel), and the stage's one output tensor is sharded
    on its last dim over that axis. ``meta`` evaluates the stage on meta tensors (to learn its output
    layout); by default a meta copy of ``module`` does.
    """

    module: nn.Module
    input_spec: Any = "R"
    column_parallel: str | None = None
    meta: Callable[[Any], Any] | None = None


def _identity(value: Any) -> Any:
    return value


@dataclass
class Pipeline:
    """Stages in order; ``loss(last stage output, target(micro-batch))``, a mean over the micro-batch's samples.

    ``tied`` lists groups of parameters that are one weight (an embedding and an output head), named
    ``"<stage index>.<parameter name in the stage module>"``; the runtime makes each group one
    parameter (the first's). Parameters that are already one tensor in several stages need no entry.
    ``loss=None`` is for ``PipelineStrategy``: the LightningModule's own ``training_step`` is the loss.
    """

    stages: list[PipelineStage]
    loss: Callable[[Any, Any], torch.Tensor] | None = None
    inputs: Callable[[Any], Any] | None = None
    target: Callable[[Any], Any] | None = None
    tied: Sequence[Sequence[str]] = ()

    def __post_init__(self) -> None:
        if self.inputs is None:
            self.inputs = operator.itemgetter(0)
        if self.target is None:
            self.target = operator.itemgetter(1)

    @staticmethod
    def whole_batch() -> Callable[[Any], Any]:
        """``target=Pipeline.whole_batch()``: the loss gets the whole micro-batch (its rows on this rank)."""
        return _identity


def get_pipeline(module: nn.Module, num_stages: int) -> Pipeline:
    hook = getattr(module, HOOK_NAME, None)
    if hook is None:
        raise TypeError(f"{type(module).__name__} must define `{HOOK_NAME}(self) -> Pipeline` (or pass "
                        "PipelineStrategy(split_points=[...])) to run with the pipeline strategy")
    pipeline = hook()
    if len(pipeline.stages) != num_stages:
        raise ValueError(f"{type(module).__name__}.{HOOK_NAME}() returned {len(pipeline.stages)} stages but the "
                         f"strategy expects {num_stages} (stage meshes x virtual stages)")
    return pipeline

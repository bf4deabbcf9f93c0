"""What a LightningModule hands the pipeline: its stages, their input layouts, and the loss.

The one hook is ``pipeline_stages(self) -> Pipeline``. Batches are ``(inputs, target, ...)`` with the
batch dimension first; the loss must be a mean over that dimension (as ``cross_entropy`` is), so the
micro-batch losses, weighted by their share of rows, add up to the full-batch loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lightning_grendel.resharding.mesh import Mesh, ShardingSpec

HOOK_NAME = "pipeline_stages"


@dataclass
class PipelineStage:
    """A module and the layout it wants its input in on its stage mesh (``"S1"``: rows over mesh axis 1).

    Only the batch dimension of the input may be sharded (data parallel inside the stage mesh).
    ``column_parallel`` names the stage's final ``nn.Linear``: it is then split over the last mesh
    axis (tensor parallel), and the stage output is sharded on its last dim over that axis.
    """

    module: nn.Module
    input_spec: str = "R"
    column_parallel: str | None = None


@dataclass
class Pipeline:
    """Stages in order, and ``loss(last stage output, target)``, a mean over the batch dimension."""

    stages: list[PipelineStage]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def resolve_stage_specs(stage: PipelineStage, mesh: Mesh, index: int, input_ndim: int | None) -> ShardingSpec:
    """Parse and check a stage's input spec against its mesh (clear error before any communication)."""
    spec = ShardingSpec.parse(stage.input_spec, input_ndim)
    if any(spec.dims[1:]):
        raise ValueError(f"stage {index}: input spec {spec} shards a non-batch dim; only dim 0 may be sharded")
    for axis in spec.dims[0]:
        if axis >= mesh.ndim:
            raise ValueError(f"stage {index}: input spec {spec} names mesh axis {axis}, but the stage mesh "
                             f"has shape {mesh.shape}")
    if stage.column_parallel is not None and mesh.ndim - 1 in spec.dims[0]:
        raise ValueError(f"stage {index}: the last mesh axis is the tensor-parallel axis, so the input spec "
                         f"{spec} must not shard rows over it")
    return spec


def output_spec(input_spec: ShardingSpec, output_ndim: int, tensor_parallel_axis: int | None) -> ShardingSpec:
    """A stage maps rows to rows, so its output keeps the input's batch sharding (plus the TP features)."""
    dims = [input_spec.dims[0]] + [()] * (output_ndim - 1)
    if tensor_parallel_axis is not None:
        if output_ndim < 2:
            raise ValueError("a column-parallel stage needs an output with a feature dim after the batch dim")
        dims[-1] = (tensor_parallel_axis,)
    return ShardingSpec(tuple(dims))


def get_pipeline(module: nn.Module, num_stages: int) -> Pipeline:
    hook = getattr(module, HOOK_NAME, None)
    if hook is None:
        raise TypeError(f"{type(module).__name__} must define `{HOOK_NAME}(self) -> Pipeline` to run with the "
                        "pipeline strategy")
    pipeline = hook()
    if len(pipeline.stages) != num_stages:
        raise ValueError(f"{type(module).__name__}.{HOOK_NAME}() returned {len(pipeline.stages)} stages but the "
                         f"strategy expects {num_stages} (stage meshes x virtual stages)")
    return pipeline

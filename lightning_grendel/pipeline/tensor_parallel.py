"""Column-parallel ``nn.Linear`` inside a stage mesh: each rank on the last mesh axis computes a slice
of the output features, so the stage's output is sharded on its last dim and the next stage (on a
mesh of another shape) receives it through cross-mesh resharding.

The Linear keeps its full-size parameters (state dicts and optimisers stay unchanged); only the rows
of this rank's slice are computed and receive gradient here, and the stage's gradient reduction then
gives every rank the full gradient. The input is replicated over the tensor-parallel axis, so its
gradient is summed over that axis in backward.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from lightning_grendel.resharding.mesh import chunk_bounds


class _ReplicatedInput(torch.autograd.Function):
    """Identity forward; backward sums the partial input gradients over the tensor-parallel group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def find_linear(module: nn.Module, name: str) -> nn.Linear:
    target = module.get_submodule(name)
    if not isinstance(target, nn.Linear):
        raise ValueError(f"column_parallel names {name!r}, a {type(target).__name__}, not an nn.Linear")
    return target


def make_column_parallel(linear: nn.Linear, index: int, parts: int, group: dist.ProcessGroup) -> tuple[int, int]:
    """Make ``linear`` compute output features ``[start, stop)`` (chunk ``index`` of ``parts``)."""
    start, stop = chunk_bounds(linear.out_features, parts, index)

    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias[start:stop]
        return F.linear(_ReplicatedInput.apply(x, group), self.weight[start:stop], bias)

    linear.forward = types.MethodType(forward, linear)
    return start, stop

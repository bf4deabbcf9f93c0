"""Scene-wide sums and means of Gaussian quantities when each rank holds a shard of the Gaussians.

Under GrendelStrategy every rank's loss is the *scene-wide* loss, the same number on every rank: each
rank computes its share (the loss of its pixel rows, the sum over its Gaussian rows), and
:func:`sum_over_ranks` adds the shares up. Its backward is the identity: a rank's share gets the
gradient of the scene-wide loss, which is what the single-process gradient of the rows it owns is,
because every rank backpropagates the same replicated loss only into what it computed itself. (An
all-reduce whose backward sums the gradients too, like ``torch.distributed.nn.all_reduce``, would give
W times that gradient here.)

A plain ``x.mean()`` over a shard is the mean of that shard only: added to the loss on every rank, its
gradients scale with the world size (it divides by N/W instead of N). Nothing can detect that, so the
module's docstring and docs/grendel.md say it where users look.

Every function here is a collective when a process group of more than one rank is given: every rank
must call it the same number of times, in the same order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, share: Tensor, group: Any) -> Tensor:
        total = share.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None  # the loss is replicated: each rank's share gets the scene-wide loss's gradient


def sum_over_ranks(share: Tensor, group: Any = None, sharded: bool = True) -> Tensor:
    """Every rank's ``share`` added up, the same on every rank; gradients flow to this rank's share.

    Args:
        share: this rank's part of a scene-wide quantity (any shape; summed elementwise over ranks).
        group: the process group (the default group when None).
        sharded: False when every rank holds every Gaussian (one process, or a replicating strategy):
            then the share is already the whole and nothing is communicated.
    """
    if not sharded or not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return share
    return _SumOverRanks.apply(share, group)


def gaussian_sum(values: Tensor, group: Any = None, sharded: bool = True) -> Tensor:
    """The sum of ``values`` [N_local, ...] over every element of every rank's shard (a scalar)."""
    return sum_over_ranks(values.sum(), group, sharded)


def gaussian_mean(values: Tensor, group: Any = None, sharded: bool = True) -> Tensor:
    """The mean of ``values`` [N_local, ...] over every element of every rank's shard (a scalar).

    Sum and element count travel in one float64 all-reduce, so counts beyond 2^24 stay exact.
    """
    count = torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device)
    total = sum_over_ranks(torch.stack([values.sum().to(torch.float64), count]), group, sharded)
    return (total[0] / total[1].clamp_min(1.0)).to(values.dtype)

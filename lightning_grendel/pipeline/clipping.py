"""Gradient clipping by the norm over the whole pipeline, as ``torch.nn.utils.clip_grad_norm_`` on the plain model.

A pipeline rank holds the gradients of its own stage only, so ``clip_grad_norm_`` there clips each
stage by its own norm. The global norm needs every parameter counted exactly once over the world:
``ownership.counted_parameters`` says which ones a rank counts, :func:`clip_grad_norm_` adds the
ranks' shares and scales every local gradient by the one resulting factor. Clipping by value needs nothing:
it is elementwise, and every rank holding a parameter holds its full gradient.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

_GRAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _norm_parts(norm_type: float) -> tuple[bool, dist.ReduceOp]:
    if norm_type == math.inf:
        return True, dist.ReduceOp.MAX
    if not 0 < norm_type < math.inf:
        raise ValueError(f"norm_type {norm_type}: the pipeline's global norm supports a positive p or inf")
    return False, dist.ReduceOp.SUM


def global_grad_norm(counted: Iterable[torch.Tensor], norm_type: float = 2.0,
                     group: dist.ProcessGroup | None = None, local: Iterable[torch.Tensor] = ()) -> torch.Tensor:
    """The ``norm_type``-norm of the gradients counted by all ranks of ``group`` together (collective).

    Each rank computes the norm of each of its counted gradients as torch does; the shares are added
    (``p``-th powers) or maxed (``inf``) in float64 in one all-reduce, which also carries whether a
    share is NaN (a max may drop it) and which dtypes the gradients of ``counted`` and ``local`` (this
    rank's other parameters) have. The total is then rounded, on every rank alike, to the promotion
    of all those dtypes (float32 if there are none): the dtype torch's total has on the plain model.
    """
    is_max, op = _norm_parts(norm_type)
    counted = [p for p in counted if p.grad is not None]
    norms = [torch.linalg.vector_norm(p.grad, norm_type).double() for p in counted]
    holders = counted + [p for p in local if p.grad is not None]
    device = holders[0].grad.device if holders else torch.device("cpu")
    share = torch.zeros((), dtype=torch.float64, device=device)
    if norms:
        share = torch.stack(norms).max() if is_max else torch.stack(norms).pow(norm_type).sum()
    present = [any(p.grad.dtype == dtype for p in holders) for dtype in _GRAD_DTYPES]
    packed = torch.tensor([0.0 if share.isnan() else share.item(), float(share.isnan()), *map(float, present)],
                          dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=op, group=group)
    total = packed[0] if is_max else packed[0].pow(1.0 / norm_type)
    if packed[1] > 0:
        total = torch.full_like(total, math.nan)
    dtypes = [dtype for dtype, flag in zip(_GRAD_DTYPES, packed[2:].tolist(), strict=True) if flag > 0]
    return total.to(functools.reduce(torch.promote_types, dtypes) if dtypes else torch.float32)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], counted: Iterable[torch.Tensor], max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over a pipeline (collective over ``group``, default: the world).

    ``parameters`` are this rank's (all of them are scaled), ``counted`` the subset it counts in the
    norm (``ownership.counted_parameters``). Every rank computes the same total (:func:`global_grad_norm`),
    scales by the same ``min(1, max_norm / (total_norm + 1e-6))`` in the total's dtype, as torch does,
    and raises the same error on a non-finite norm when ``error_if_nonfinite``; returns the total.
    """
    parameters = [p for p in parameters if p.grad is not None]
    total = global_grad_norm(counted, norm_type, group, parameters)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
                           "so it cannot be clipped. To disable this error and scale the gradients by the "
                           "non-finite norm anyway, set `error_if_nonfinite=False`")
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in parameters:
        p.grad.mul_(coefficient.to(p.grad.device))
    return total

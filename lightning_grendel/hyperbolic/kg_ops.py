"""The lookups of a knowledge-graph step: tails scored against the entity table, per-relation maps.

``tail_scores`` and ``relation_matvec`` run ``csrc/kg_ops.cpp`` on CPU float tensors (no gathered
``(B, n, d)`` / ``(B, d, d)`` copies, gradients accumulated straight into the tables) and otherwise
their PyTorch references below, which the tests compare them with (values and gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_grendel.hyperbolic import cpp

_DTYPES = (torch.float32, torch.float64)


def _kernel_applies(*tensors: Tensor) -> bool:
    floats = [t for t in tensors if t.is_floating_point()]
    return (all(t.device.type == "cpu" for t in tensors) and floats[0].dtype in _DTYPES
            and all(t.dtype == floats[0].dtype for t in floats) and cpp.load(cpp.KG_OPS) is not None)


def tail_scores_reference(h: Tensor, table: Tensor, bias: Tensor, tails: Tensor) -> Tensor:
    """``<h[b], table[tails[b, j]]>_L + bias[tails[b, j]]`` with ``index_select`` and ``bmm``."""
    flat = tails.reshape(-1)
    rows = table.index_select(0, flat).view(*tails.shape, table.shape[-1])
    signed = torch.cat([-h[:, :1], h[:, 1:]], dim=-1)
    return torch.bmm(rows, signed.unsqueeze(-1)).squeeze(-1) + bias.index_select(0, flat).view(tails.shape)


def relation_matvec_reference(weight: Tensor, x: Tensor, relation: Tensor) -> Tensor:
    """``weight[relation[b]] @ x[b]`` with ``index_select`` and ``bmm``."""
    return torch.bmm(weight.index_select(0, relation), x.unsqueeze(-1)).squeeze(-1)


class _TailScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, table, bias, tails):  # type: ignore[override]
        h, table, tails = h.contiguous(), table.contiguous(), tails.contiguous()
        ctx.save_for_backward(h, table, tails)
        return cpp.load(cpp.KG_OPS).tail_scores(h, table, bias.contiguous(), tails)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        h, table, tails = ctx.saved_tensors
        grad_h, grad_table, grad_bias = cpp.load(cpp.KG_OPS).tail_scores_backward(grad.contiguous(), h, table, tails)
        return grad_h, grad_table, grad_bias, None


class _RelationMatvec(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, x, relation):  # type: ignore[override]
        weight, x, relation = weight.contiguous(), x.contiguous(), relation.contiguous()
        ctx.save_for_backward(weight, x, relation)
        return cpp.load(cpp.KG_OPS).relation_matvec(weight, x, relation)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        weight, x, relation = ctx.saved_tensors
        grad_weight, grad_x = cpp.load(cpp.KG_OPS).relation_matvec_backward(grad.contiguous(), weight, x, relation)
        return grad_weight, grad_x, None


def tail_scores(h: Tensor, table: Tensor, bias: Tensor, tails: Tensor) -> Tensor:
    """``(B, n)`` scores ``<h[b], table[tails[b, j]]>_L + bias[tails[b, j]]`` of ``h`` ``(B, d)``."""
    if _kernel_applies(h, table, bias, tails):
        return _TailScores.apply(h, table, bias, tails)
    return tail_scores_reference(h, table, bias, tails)


def relation_matvec(weight: Tensor, x: Tensor, relation: Tensor) -> Tensor:
    """``(B, d_out)``: ``weight[relation[b]] @ x[b]`` for ``weight`` ``(R, d_out, d)``, ``x`` ``(B, d)``."""
    if _kernel_applies(weight, x, relation):
        return _RelationMatvec.apply(weight, x, relation)
    return relation_matvec_reference(weight, x, relation)

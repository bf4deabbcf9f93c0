"""Differentiable sparse all-to-all of row blocks, on ``all_to_all_single`` with split sizes.

The list form of ``all_to_all`` fails on gloo with uneven sizes, so everything here is one flat tensor
plus split sizes. The backward pass is the reverse exchange, which routes each received row's gradient
back to the rank that owns the Gaussian.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def exchange_rows(rows: Tensor, send_counts: list[int], recv_counts: list[int], group: Any = None) -> Tensor:
    """Send ``rows[offset_k : offset_k + send_counts[k]]`` to rank k; return the rows received, by source rank."""
    received = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
    dist.all_to_all_single(
        received, rows.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts, group=group
    )
    return received


def exchange_counts(send_counts: Tensor, group: Any = None) -> Tensor:
    """Each rank's [W, ...] counts per destination -> the [W, ...] counts each source sends here."""
    received = torch.empty_like(send_counts)
    dist.all_to_all_single(received, send_counts.contiguous(), group=group)
    return received


class _SparseAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, rows: Tensor, send_counts: list[int], recv_counts: list[int], group: Any) -> Tensor:
        ctx.send_counts, ctx.recv_counts, ctx.group = send_counts, recv_counts, group
        return exchange_rows(rows, send_counts, recv_counts, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return exchange_rows(grad, ctx.recv_counts, ctx.send_counts, ctx.group), None, None, None


def sparse_all_to_all(rows: Tensor, send_counts: list[int], recv_counts: list[int], group: Any = None) -> Tensor:
    """:func:`exchange_rows` with a backward pass that returns gradients to the senders."""
    return _SparseAllToAll.apply(rows, send_counts, recv_counts, group)

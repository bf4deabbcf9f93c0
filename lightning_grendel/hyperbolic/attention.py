"""``LorentzMultiheadAttention``: squared-distance scores, Lorentz-centroid aggregation."""

from __future__ import annotations

import math as pymath

import torch
from torch import Tensor, nn

from lightning_grendel.hyperbolic import math as lm
from lightning_grendel.hyperbolic.linear import LorentzLinear
from lightning_grendel.hyperbolic.manifold import LorentzManifold


class LorentzMultiheadAttention(nn.Module):
    """Multi-head attention between points of ``d_model`` coordinates, heads of ``d_model // heads``.

    ``score = -d_L^2(q, k) / s + b`` (``s`` learnable, init ``sqrt(d_model)``), masked, softmaxed; each
    head's output is the weighted Lorentz centroid of its values, hence on the hyperboloid without a
    tangent-space detour. Returns ``(..., L_q, d_model)`` as ``heads`` concatenated points: there is no
    output projection, the residual :class:`~.transformer.LorentzResidual` merges the heads.

    Masks follow ``torch.nn.MultiheadAttention``: ``key_padding_mask`` ``(B, L_k)`` and ``attn_mask``
    ``(L_q, L_k)`` are boolean with True meaning "may not attend".
    """

    def __init__(self, manifold: LorentzManifold, d_model: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} is not divisible by heads={heads}")
        self.manifold = manifold
        self.heads = heads
        self.query = LorentzLinear(manifold, d_model, d_model, heads=heads)
        self.key = LorentzLinear(manifold, d_model, d_model, heads=heads)
        self.value = LorentzLinear(manifold, d_model, d_model, heads=heads)
        self.scale = nn.Parameter(torch.tensor(pymath.sqrt(d_model)))
        self.bias = nn.Parameter(torch.zeros(()))
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        q = self.query(query).unflatten(-1, (self.heads, -1)).transpose(-2, -3)  # (B, H, Lq, dh)
        k = self.key(key).unflatten(-1, (self.heads, -1)).transpose(-2, -3)
        v = self.value(value).unflatten(-1, (self.heads, -1)).transpose(-2, -3)
        curv = self.manifold.k.to(q)
        scores = (2.0 * curv + 2.0 * lm.cinner(q, k)) / self.scale + self.bias  # -d_L^2 / s + b
        if attn_mask is not None:
            scores = scores.masked_fill(attn_mask, torch.finfo(scores.dtype).min)
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        weights = self.dropout(torch.softmax(scores, dim=-1))
        out = lm.centroid(v, curv, weights)  # (B, H, Lq, dh)
        return out.transpose(-2, -3).flatten(-2)

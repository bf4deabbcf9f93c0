"""``LorentzLinear``: HyboNet's fully hyperbolic linear layer (a learned boost + rotation + rescale)."""

from __future__ import annotations

import math as pymath
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_grendel.hyperbolic import math as lm
from lightning_grendel.hyperbolic.manifold import LorentzManifold


class LorentzLinear(nn.Module):
    """Maps points (``in_features`` = n+1 coordinates) to points, with no trip through a tangent space.

    ``z = W dropout(nonlin(x)) (+ bias) (+ bias_point)``; each of the ``heads`` output slices of
    ``out_features / heads`` coordinates becomes its own point with
    ``time = sigmoid(z0) * exp(scale) + time_offset * sqrt(k)`` (bounded, so no overflow) and the space
    part rescaled onto the hyperboloid. ``bias_point`` lets a caller add a residual point or a
    positional vector before the time is computed, which is how HyboNet does residual connections.
    """

    def __init__(
        self,
        manifold: LorentzManifold,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dropout: float = 0.0,
        nonlin: Callable[[Tensor], Tensor] | None = None,
        heads: int = 1,
        scale: float = 10.0,
        learn_scale: bool = True,
        time_offset: float = 1.1,
    ) -> None:
        super().__init__()
        if out_features % heads:
            raise ValueError(f"out_features={out_features} is not divisible by heads={heads}")
        if time_offset <= 1.0:
            raise ValueError(f"time_offset must exceed 1 (time >= time_offset * sqrt(k)), got {time_offset}")
        self.manifold = manifold
        self.heads = heads
        self.nonlin = nonlin
        self.time_offset = time_offset
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.log_scale = nn.Parameter(torch.tensor(pymath.log(scale)), requires_grad=learn_scale)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small uniform weights; the input time column starts at zero (it carries no direction)."""
        bound = 1.0 / pymath.sqrt(self.linear.out_features)
        nn.init.uniform_(self.linear.weight, -bound, bound)
        with torch.no_grad():
            self.linear.weight[:, 0] = 0.0
        if self.linear.bias is not None:
            nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor, bias_point: Tensor | None = None) -> Tensor:
        if self.nonlin is not None:
            x = self.nonlin(x)
        z = self.linear(self.dropout(x))
        if bias_point is not None:
            z = z + bias_point
        z = z.unflatten(-1, (self.heads, -1))
        k = self.manifold.k.to(z)
        out = lm.bounded_time_point(z, k, self.log_scale.exp(), self.time_offset * torch.sqrt(k))
        return out.flatten(-2)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, time_offset={self.time_offset}"

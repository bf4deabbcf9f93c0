"""Distance-based decoder: logits are negative squared Lorentzian distances to learned class points."""

from __future__ import annotations

import geoopt
import torch
from torch import Tensor, nn

from lightning_grendel.hyperbolic import math as lm
from lightning_grendel.hyperbolic.manifold import LorentzManifold


class LorentzDistanceClassifier(nn.Module):
    """``logit_c = 2k + 2<x, p_c>_L + b_c = -d_L^2(x, p_c) + b_c`` against class points ``p_c``.

    No tangent-space map is involved, so the decoder stays fully hyperbolic; the class points are
    ``ManifoldParameter``s and the biases Euclidean.
    """

    def __init__(self, manifold: LorentzManifold, dim: int, num_classes: int, std: float = 0.1) -> None:
        super().__init__()
        self.manifold = manifold
        self.points = geoopt.ManifoldParameter(manifold.random_normal(num_classes, dim, std=std),
                                               manifold=manifold)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x: Tensor) -> Tensor:
        k = self.manifold.k.to(x)
        return 2.0 * k + 2.0 * lm.cinner(x, self.points) + self.bias

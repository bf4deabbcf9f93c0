"""``LorentzEmbedding``: a table of points on the hyperboloid, trained with Riemannian optimisers."""

from __future__ import annotations

import geoopt
from torch import Tensor, nn

from lightning_grendel.hyperbolic.manifold import LorentzManifold


class LorentzEmbedding(nn.Module):
    """``num_embeddings`` points of ``dim`` coordinates (time first) as a ``geoopt.ManifoldParameter``.

    Initialised as ``expmap0`` of Gaussian tangent vectors with standard deviation ``std``, so the
    points start near the origin where gradients are well scaled.
    """

    def __init__(self, manifold: LorentzManifold, num_embeddings: int, dim: int, std: float = 0.1) -> None:
        super().__init__()
        self.manifold = manifold
        self.weight = geoopt.ManifoldParameter(manifold.random_normal(num_embeddings, dim, std=std),
                                               manifold=manifold)

    def forward(self, idx: Tensor) -> Tensor:
        return self.weight[idx]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}"

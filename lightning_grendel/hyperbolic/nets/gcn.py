"""HyboNet graph convolution: LorentzLinear per node, then Lorentz-centroid neighbourhood aggregation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_grendel.hyperbolic import math as lm
from lightning_grendel.hyperbolic.classifier import LorentzDistanceClassifier
from lightning_grendel.hyperbolic.linear import LorentzLinear
from lightning_grendel.hyperbolic.manifold import LorentzManifold


class LorentzGraphConv(nn.Module):
    """``out_i = centroid_j(A_ij, LorentzLinear(x)_j)``: the weighted Lorentz centroid over neighbours
    (``adjacency`` rows are the weights, dense or sparse), so aggregation never leaves the manifold."""

    def __init__(self, manifold: LorentzManifold, in_features: int, out_features: int, dropout: float = 0.0,
                 nonlin=None, bias: bool = True) -> None:
        super().__init__()
        self.manifold = manifold
        self.linear = LorentzLinear(manifold, in_features, out_features, bias=bias, dropout=dropout, nonlin=nonlin)

    def forward(self, x: Tensor, adjacency: Tensor) -> Tensor:
        return lm.centroid(self.linear(x), self.manifold.k.to(x), adjacency)


class HyboNetGCN(nn.Module):
    """Node encoder: Euclidean features -> ``expmap0((0, f))`` -> ``num_layers`` graph convolutions.

    As in HyboNet the only nonlinearity by default is the LorentzLinear re-normalisation itself
    (``nonlin`` applies one before every layer but the first). ``encode`` gives points of ``hidden + 1``
    coordinates; ``forward`` adds the distance-based node classifier, ``pair_sqdist`` gives the
    squared Lorentzian distances that link prediction decodes.
    """

    def __init__(self, in_features: int, hidden: int, num_classes: int, num_layers: int = 2, k: float = 1.0,
                 dropout: float = 0.0, nonlin: str | None = None) -> None:
        super().__init__()
        self.manifold = LorentzManifold(k)
        act = {None: None, "relu": torch.relu}[nonlin]
        dims = [in_features + 1] + [hidden + 1] * num_layers
        self.layers = nn.ModuleList(
            LorentzGraphConv(self.manifold, dims[i], dims[i + 1], dropout=dropout, nonlin=act if i > 0 else None)
            for i in range(num_layers)
        )
        self.classifier = LorentzDistanceClassifier(self.manifold, hidden + 1, num_classes)

    def encode(self, features: Tensor, adjacency: Tensor) -> Tensor:
        x = torch.cat([torch.zeros_like(features[:, :1]), features], dim=-1)
        x = self.manifold.expmap0(x)
        for layer in self.layers:
            x = layer(x, adjacency)
        return x

    def forward(self, features: Tensor, adjacency: Tensor) -> Tensor:
        return self.classifier(self.encode(features, adjacency))

    def pair_sqdist(self, h: Tensor, pairs: Tensor) -> Tensor:
        """Squared Lorentzian distance ``d_L^2`` between the endpoints of ``(E, 2)`` node pairs."""
        return lm.sqdist(h[pairs[:, 0]], h[pairs[:, 1]], self.manifold.k.to(h))


class EuclideanGCN(nn.Module):
    """The Euclidean baseline of the same size: ``num_layers`` graph convolutions ``A_norm @ W h`` to
    ``hidden`` features (ReLU between layers) and squared Euclidean distances for link prediction.
    It has one coordinate fewer per node than :class:`HyboNetGCN` (whose time coordinate is implied)
    and the same weight-matrix shapes but the time column."""

    def __init__(self, in_features: int, hidden: int, num_layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        dims = [in_features] + [hidden] * num_layers
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(num_layers))
        self.dropout = nn.Dropout(dropout)

    def encode(self, features: Tensor, adjacency: Tensor) -> Tensor:
        x = features
        for i, layer in enumerate(self.layers):
            if i > 0:
                x = torch.relu(x)
            x = adjacency @ layer(self.dropout(x))
        return x

    def pair_sqdist(self, h: Tensor, pairs: Tensor) -> Tensor:
        """Squared Euclidean distance between the endpoints of ``(E, 2)`` node pairs."""
        return (h[pairs[:, 0]] - h[pairs[:, 1]]).pow(2).sum(-1)

"""Fully hyperbolic (Lorentz model) networks: maths as functions, a geoopt manifold, layers, models."""

from lightning_grendel.hyperbolic.attention import LorentzMultiheadAttention
from lightning_grendel.hyperbolic.classifier import LorentzDistanceClassifier
from lightning_grendel.hyperbolic.embedding import LorentzEmbedding
from lightning_grendel.hyperbolic.linear import LorentzLinear
from lightning_grendel.hyperbolic.manifold import LorentzManifold
from lightning_grendel.hyperbolic.math import boost_matrix, rotation_matrix
from lightning_grendel.hyperbolic.transformer import (
    LorentzFeedForward,
    LorentzResidual,
    LorentzTransformerDecoder,
    LorentzTransformerEncoder,
)

__all__ = [
    "LorentzDistanceClassifier",
    "LorentzEmbedding",
    "LorentzFeedForward",
    "LorentzLinear",
    "LorentzManifold",
    "LorentzMultiheadAttention",
    "LorentzResidual",
    "LorentzTransformerDecoder",
    "LorentzTransformerEncoder",
    "boost_matrix",
    "rotation_matrix",
]

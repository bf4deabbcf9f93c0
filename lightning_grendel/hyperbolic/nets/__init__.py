"""HyboNet networks built from the Lorentz layers: knowledge-graph scorer, GCN, sequence models."""

from lightning_grendel.hyperbolic.nets.gcn import HyboNetGCN
from lightning_grendel.hyperbolic.nets.kg import HyboNetKG
from lightning_grendel.hyperbolic.nets.seq import LorentzSeq2Seq, LorentzSequenceClassifier

__all__ = ["HyboNetGCN", "HyboNetKG", "LorentzSeq2Seq", "LorentzSequenceClassifier"]

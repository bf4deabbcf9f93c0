"""``LorentzGCNModule``: HyboNet GCN node classification on a full-batch graph (Planetoid)."""

from __future__ import annotations

from typing import Literal

import geoopt
import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    multiclass_accuracy,
    multiclass_f1_score,
)

from lightning_grendel.hyperbolic.modules.finite import StopOnNonFinite
from lightning_grendel.hyperbolic.nets.gcn import EuclideanGCN, HyboNetGCN


def weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimiser groups: weight matrices (``*.weight`` of 2-D Euclidean parameters) decay, the rest
    (biases, scales, curvature, ManifoldParameters) do not, as in HyboNet."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        matrix = not isinstance(p, geoopt.ManifoldParameter) and name.endswith("weight") and p.dim() == 2
        (decay if matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class LorentzGCNModule(StopOnNonFinite, L.LightningModule):
    """Trains on ``idx_train``; logs ``{train,val,test}/{loss,acc,f1}`` (micro accuracy, macro F1).

    ``loss="margin"`` is HyboNet's ``mean(relu(margin - logit_true + logit_c))``; ``"ce"`` is cross
    entropy. Weight decay applies to Euclidean weight matrices only (not to biases, scales, curvature
    or ManifoldParameters). Feature and class counts come from the datamodule when not given.

    Args:
        in_features: input feature count (taken from the datamodule when None).
        num_classes: node classes (taken from the datamodule when None).
        hidden: space dimensions of the node embeddings (HyboNet's points have one more coordinate).
        num_layers: graph convolutions.
        k: the hyperboloid's ``-<x,x>_L`` (curvature ``-1/k``).
        dropout: dropout on every layer's input.
        nonlin: ``"relu"`` before every layer but the first (None: only LorentzLinear's re-normalisation).
        loss: ``"ce"`` (cross entropy) or ``"margin"`` (HyboNet's margin loss, see above).
        margin: the margin of ``loss="margin"``.
        lr: learning rate of RiemannianAdam.
        weight_decay: on weight matrices only.
        stabilize: RiemannianAdam projects parameters back onto their manifold every this many steps (None: never).
    """

    def __init__(self, in_features: int | None = None, num_classes: int | None = None, hidden: int = 16,
                 num_layers: int = 2, k: float = 1.0, dropout: float = 0.5, nonlin: Literal["relu"] | None = None,
                 loss: Literal["ce", "margin"] = "ce", margin: float = 2.0, lr: float = 0.01,
                 weight_decay: float = 5e-4, stabilize: int | None = 10) -> None:
        super().__init__()
        if loss not in ("ce", "margin"):
            raise ValueError(f"loss must be 'ce' or 'margin', got {loss!r}")
        self.save_hyperparameters()
        self.model: HyboNetGCN | None = None
        if in_features is not None and num_classes is not None:
            self._build(in_features, num_classes)

    def _build(self, in_features: int, num_classes: int) -> None:
        hp = self.hparams
        self.hparams.update(in_features=in_features, num_classes=num_classes)
        self.model = HyboNetGCN(in_features, hp.hidden, num_classes, hp.num_layers, hp.k, hp.dropout, hp.nonlin)

    def setup(self, stage: str) -> None:
        if self.model is None:
            dm = self.trainer.datamodule
            self._build(dm.num_features, dm.num_classes)

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.hparams.loss == "ce":
            return F.cross_entropy(logits, labels)
        true = logits.gather(1, labels.unsqueeze(1))
        return F.relu(self.hparams.margin - true + logits).mean()

    def _shared(self, batch: dict[str, Tensor], split: str) -> Tensor:
        logits = self.model(batch["features"], batch["adjacency"])
        idx = batch[f"idx_{split}"]
        labels = batch["labels"][idx]
        logits = logits[idx]
        loss = self._loss(logits, labels)
        n = self.model.classifier.bias.shape[0]
        self.log(f"{split}/loss", loss, batch_size=len(idx))
        self.log(f"{split}/acc", multiclass_accuracy(logits, labels, n, average="micro"), prog_bar=True,
                 batch_size=len(idx))
        self.log(f"{split}/f1", multiclass_f1_score(logits, labels, n, average="macro"), batch_size=len(idx))
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._shared(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._shared(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return geoopt.optim.RiemannianAdam(weight_decay_groups(self, self.hparams.weight_decay),
                                           lr=self.hparams.lr, stabilize=self.hparams.stabilize)


class LorentzGCNLinkModule(StopOnNonFinite, L.LightningModule):
    """Graph link prediction with a Fermi-Dirac decoder ``p = sigmoid((r - d^2) / t)`` on the squared
    distance of the two encoded endpoints (HGCN's and HyboNet's set-up).

    Each step draws ``num_negatives`` fresh non-edges of the training graph per training edge (HGCN's
    negatives are all pairs that are not training edges). ``loss="bce"`` is cross entropy on the
    decoder's logits; ``"margin"`` is HyboNet's ``relu(margin + d^2_pos - d^2_neg)``. Validation and
    test log ``roc_auc`` and ``ap`` of ``-d^2`` on the held-out edges against as many non-edges
    (datamodules with ``link_prediction=True`` or ``task="lp"``). ``geometry="euclidean"`` swaps in a
    Euclidean GCN of the same width and depth (plain Adam) as the baseline.

    Args:
        in_features: input feature count (taken from the datamodule when None).
        hidden: space dimensions of the node embeddings (HyboNet's points have one more coordinate).
        num_layers: graph convolutions.
        k: the hyperboloid's ``-<x,x>_L`` (curvature ``-1/k``).
        dropout: dropout on every layer's input.
        nonlin: ``"relu"`` before every layer but the first (HyboNet uses none for link prediction).
        geometry: ``"lorentz"`` (HyboNet) or ``"euclidean"`` (GCN baseline).
        loss: ``"bce"`` or ``"margin"``.
        r: Fermi-Dirac radius.
        t: Fermi-Dirac temperature.
        margin: the margin of ``loss="margin"``.
        num_negatives: sampled non-edges per training edge and step.
        lr: learning rate.
        weight_decay: on weight matrices only.
        stabilize: RiemannianAdam's ``stabilize`` period.
    """

    def __init__(self, in_features: int | None = None, hidden: int = 16, num_layers: int = 2, k: float = 1.0,
                 dropout: float = 0.0, nonlin: str | None = None,
                 geometry: Literal["lorentz", "euclidean"] = "lorentz", loss: Literal["bce", "margin"] = "bce",
                 r: float = 2.0, t: float = 1.0, margin: float = 2.0, num_negatives: int = 1, lr: float = 0.01,
                 weight_decay: float = 0.0, stabilize: int | None = 10) -> None:
        super().__init__()
        if geometry not in ("lorentz", "euclidean"):
            raise ValueError(f"geometry must be 'lorentz' or 'euclidean', got {geometry!r}")
        if loss not in ("bce", "margin"):
            raise ValueError(f"loss must be 'bce' or 'margin', got {loss!r}")
        if t <= 0 or num_negatives < 1:
            raise ValueError(f"need t > 0 and num_negatives >= 1, got t={t}, num_negatives={num_negatives}")
        self.save_hyperparameters()
        self.model: HyboNetGCN | EuclideanGCN | None = None
        if in_features is not None:
            self._build(in_features)

    def _build(self, in_features: int) -> None:
        hp = self.hparams
        self.hparams.update(in_features=in_features)
        if hp.geometry == "euclidean":
            self.model = EuclideanGCN(in_features, hp.hidden, hp.num_layers, hp.dropout)
        else:
            self.model = HyboNetGCN(in_features, hp.hidden, 1, hp.num_layers, hp.k, hp.dropout, hp.nonlin)

    def setup(self, stage: str) -> None:
        if self.model is None:
            self._build(self.trainer.datamodule.num_features)

    def sample_negatives(self, pos: Tensor, num_nodes: int) -> Tensor:
        """``num_negatives * len(pos)`` uniform node pairs, redrawn where they hit a
        training edge or a self pair (until none does; a sparse graph needs one or two rounds)."""
        edge_keys = torch.cat([pos[:, 0] * num_nodes + pos[:, 1], pos[:, 1] * num_nodes + pos[:, 0]]).sort().values
        neg = torch.randint(0, num_nodes, (len(pos) * self.hparams.num_negatives, 2), device=pos.device)
        for _ in range(1000):
            keys = neg[:, 0] * num_nodes + neg[:, 1]
            where = torch.searchsorted(edge_keys, keys).clamp_max(len(edge_keys) - 1)
            bad = (edge_keys[where] == keys) | (neg[:, 0] == neg[:, 1])
            if not bad.any():
                break
            neg[bad] = torch.randint(0, num_nodes, (int(bad.sum()), 2), device=pos.device)
        return neg

    def link_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The training loss on the training edges and freshly drawn negatives."""
        h = self.model.encode(batch["features"], batch["adjacency"])
        pos = batch["train_pos"]
        d_pos = self.model.pair_sqdist(h, pos)
        d_neg = self.model.pair_sqdist(h, self.sample_negatives(pos, h.shape[0]))
        hp = self.hparams
        if hp.loss == "margin":
            loss = F.relu(hp.margin + d_pos.repeat(hp.num_negatives) - d_neg).mean()
        else:
            logits = (hp.r - torch.cat([d_pos, d_neg])) / hp.t
            labels = torch.cat([torch.ones_like(d_pos), torch.zeros_like(d_neg)])
            loss = F.binary_cross_entropy_with_logits(logits, labels)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.link_loss(batch)
        self.log("train/loss", loss, batch_size=1)
        return loss

    def link_scores(self, batch: dict[str, Tensor], split: str) -> tuple[Tensor, Tensor]:
        """Scores ``-d^2`` of the split's held-out edges and non-edges, with their 1/0 labels."""
        h = self.model.encode(batch["features"], batch["adjacency"])
        pos, neg = batch[f"{split}_pos"], batch[f"{split}_neg"]
        scores = -torch.cat([self.model.pair_sqdist(h, pos), self.model.pair_sqdist(h, neg)])
        labels = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).long().to(scores.device)
        return scores, labels

    def _evaluate(self, batch: dict[str, Tensor], split: str) -> None:
        scores, labels = self.link_scores(batch, split)
        self.log(f"{split}/roc_auc", binary_auroc(scores, labels), prog_bar=True, batch_size=1)
        self.log(f"{split}/ap", binary_average_precision(scores, labels), batch_size=1)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = weight_decay_groups(self, self.hparams.weight_decay)
        if self.hparams.geometry == "euclidean":
            return torch.optim.Adam(groups, lr=self.hparams.lr)
        return geoopt.optim.RiemannianAdam(groups, lr=self.hparams.lr, stabilize=self.hparams.stabilize)

"""``LorentzGCNModule``: HyboNet GCN node classification on a full-batch graph (Planetoid)."""

from __future__ import annotations

import geoopt
import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    multiclass_accuracy,
    multiclass_f1_score,
)

from lightning_grendel.hyperbolic.modules.finite import StopOnNonFinite
from lightning_grendel.hyperbolic.nets.gcn import HyboNetGCN


class LorentzGCNModule(StopOnNonFinite, L.LightningModule):
    """Trains on ``idx_train``; logs ``{train,val,test}/{loss,acc,f1}`` (micro accuracy, macro F1).

    ``loss="margin"`` is HyboNet's ``mean(relu(margin - logit_true + logit_c))``; ``"ce"`` is cross
    entropy. Weight decay applies to Euclidean weight matrices only (not to biases, scales, curvature
    or ManifoldParameters). Feature and class counts come from the datamodule when not given.
    """

    def __init__(self, in_features: int | None = None, num_classes: int | None = None, hidden: int = 16,
                 num_layers: int = 2, k: float = 1.0, dropout: float = 0.5, nonlin: str | None = None,
                 loss: str = "ce", margin: float = 2.0, lr: float = 0.01, weight_decay: float = 5e-4,
                 stabilize: int | None = 10) -> None:
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
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            euclidean_matrix = not isinstance(p, geoopt.ManifoldParameter) and name.endswith("linear.weight")
            (decay if euclidean_matrix else no_decay).append(p)
        return geoopt.optim.RiemannianAdam(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, stabilize=self.hparams.stabilize,
        )


class LorentzGCNLinkModule(LorentzGCNModule):
    """HyboNet GCN link prediction: ``logit = r - d_L^2(x_i, x_j)`` (Fermi-Dirac with ``t = 1``), BCE
    against as many uniformly sampled non-edges per step as there are training edges; logs ROC-AUC and
    average precision on the held-out edges (datamodule with ``link_prediction=True``)."""

    def __init__(self, in_features: int | None = None, hidden: int = 16, num_layers: int = 2, k: float = 1.0,
                 dropout: float = 0.5, nonlin: str | None = None, r: float = 2.0, lr: float = 0.01,
                 weight_decay: float = 0.0, stabilize: int | None = 10) -> None:
        super().__init__(in_features, 1 if in_features is not None else None, hidden, num_layers, k, dropout, nonlin,
                         "ce", 0.0, lr, weight_decay, stabilize)

    def setup(self, stage: str) -> None:
        if self.model is None:
            self._build(self.trainer.datamodule.num_features, 1)

    def _logits(self, h: Tensor, pairs: Tensor) -> Tensor:
        return self.hparams.r + self.model.link_logits(h, pairs)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        h = self.model.encode(batch["features"], batch["adjacency"])
        pos = batch["train_pos"]
        neg = torch.randint(0, h.shape[0], pos.shape, device=pos.device)
        logits = torch.cat([self._logits(h, pos), self._logits(h, neg)])
        labels = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).to(logits)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        self.log("train/loss", loss, batch_size=1)
        return loss

    def _evaluate(self, batch: dict[str, Tensor], split: str) -> None:
        h = self.model.encode(batch["features"], batch["adjacency"])
        pos, neg = batch[f"{split}_pos"], batch[f"{split}_neg"]
        scores = torch.cat([self._logits(h, pos), self._logits(h, neg)])
        labels = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).long().to(scores.device)
        self.log(f"{split}/roc_auc", binary_auroc(scores, labels), prog_bar=True, batch_size=1)
        self.log(f"{split}/ap", binary_average_precision(scores, labels), batch_size=1)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

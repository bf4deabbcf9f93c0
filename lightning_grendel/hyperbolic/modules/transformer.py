"""``LorentzTransformerModule``: the Lorentz transformer on sequence classification or seq2seq."""

from __future__ import annotations

from typing import Literal

import geoopt
import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_grendel.hyperbolic.data.sequences import BOS, PAD
from lightning_grendel.hyperbolic.modules.finite import StopOnNonFinite
from lightning_grendel.hyperbolic.nets.seq import LorentzSeq2Seq, LorentzSequenceClassifier


class LorentzTransformerModule(StopOnNonFinite, L.LightningModule):
    """``task="classify"``: logs ``acc``; ``task="seq2seq"``: logs teacher-forced ``token_acc`` and, in
    validation/test, greedy-decoding ``seq_acc`` (whole target sequence right). Vocabulary size and class
    count come from the datamodule (``vocab_size``, ``num_classes``, ``max_len``) when not given.

    Args:
        task: ``"classify"`` (one label per sequence) or ``"seq2seq"`` (encoder-decoder, target tokens).
        vocab_size: token ids, padding and BOS included (taken from the datamodule when None).
        num_classes: classes of ``task="classify"`` (taken from the datamodule when None).
        max_len: longest sequence in tokens; positions are learned up to ``max_len + 1`` (datamodule's when None).
        d_model: coordinates of each token's point on the hyperboloid, time coordinate included.
        heads: attention heads per layer.
        num_layers: encoder layers (and as many decoder layers for ``seq2seq``).
        d_ff: width of each layer's feed-forward block.
        dropout: dropout inside the Lorentz linear layers (positional, attention and feed-forward).
        k: the hyperboloid's ``-<x,x>_L`` (curvature ``-1/k``).
        label_smoothing: cross-entropy label smoothing (0: none); padding tokens are not scored.
        lr: learning rate of RiemannianAdam.
    """

    def __init__(self, task: Literal["classify", "seq2seq"] = "seq2seq", vocab_size: int | None = None,
                 num_classes: int | None = None, max_len: int | None = None, d_model: int = 16, heads: int = 2,
                 num_layers: int = 2, d_ff: int = 32, dropout: float = 0.0, k: float = 1.0,
                 label_smoothing: float = 0.0, lr: float = 0.005) -> None:
        super().__init__()
        if task not in ("classify", "seq2seq"):
            raise ValueError(f"task must be 'classify' or 'seq2seq', got {task!r}")
        self.save_hyperparameters()
        self.model: LorentzSeq2Seq | LorentzSequenceClassifier | None = None
        if vocab_size is not None and max_len is not None and (task == "seq2seq" or num_classes is not None):
            self._build(vocab_size, num_classes, max_len)

    def _build(self, vocab_size: int, num_classes: int | None, max_len: int) -> None:
        hp = self.hparams
        self.hparams.update(vocab_size=vocab_size, num_classes=num_classes, max_len=max_len)
        common = dict(d_model=hp.d_model, heads=hp.heads, num_layers=hp.num_layers, d_ff=hp.d_ff,
                      max_len=max_len + 1, dropout=hp.dropout, k=hp.k)
        if hp.task == "classify":
            self.model = LorentzSequenceClassifier(vocab_size, num_classes, **common)
        else:
            self.model = LorentzSeq2Seq(vocab_size, **common)

    def setup(self, stage: str) -> None:
        if self.model is None:
            dm = self.trainer.datamodule
            self._build(dm.vocab_size, dm.num_classes, dm.max_len)

    def _step(self, batch: tuple[Tensor, Tensor], split: str) -> Tensor:
        x, y = batch
        pad = x == PAD
        if self.hparams.task == "classify":
            logits = self.model(x, pad)
            loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
            self.log(f"{split}/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True, batch_size=len(y))
        else:
            tgt_in = torch.cat([torch.full_like(y[:, :1], BOS), y[:, :-1]], dim=1)
            logits = self.model(x, pad, tgt_in)
            keep = y != PAD
            loss = F.cross_entropy(logits[keep], y[keep], label_smoothing=self.hparams.label_smoothing)
            self.log(f"{split}/token_acc", (logits.argmax(-1) == y)[keep].float().mean(), batch_size=len(y))
            if split != "train":
                pred = self.model.generate(x, pad, y.shape[1], BOS)
                correct = ((pred == y) | ~keep).all(dim=1).float().mean()
                self.log(f"{split}/seq_acc", correct, prog_bar=True, batch_size=len(y))
        self.log(f"{split}/loss", loss, batch_size=len(y))
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return geoopt.optim.RiemannianAdam(self.parameters(), lr=self.hparams.lr, stabilize=10)

"""``LorentzKGModule``: HyboNet link prediction with BCE over negatives and filtered ranking metrics."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor

from lightning_grendel.hyperbolic.clip import clip_grad_norm_
from lightning_grendel.hyperbolic.modules.finite import StopOnNonFinite
from lightning_grendel.hyperbolic.nets.kg import HyboNetKG
from lightning_grendel.hyperbolic.optim import LorentzRiemannianAdam


def filtered_ranks(scores: Tensor, target: Tensor, filter_rows: Tensor, filter_cols: Tensor,
                   head: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Rank of each target among all entities after removing the other known true tails.

    Ties count against the target (rank = number of candidates scoring >= the target), the
    conservative convention. ``(filter_rows, filter_cols)`` lists each removed (query, entity) pair once
    (never a query's target); rather than overwriting a copy of ``scores``, the removed candidates that
    were counted are subtracted. Given the queries' ``head`` entities, also returns the ranks under
    HyboNet's evaluation, which removes the head too.
    """
    target_score = scores.gather(1, target.unsqueeze(1))
    ranks = (scores >= target_score).sum(dim=1)
    counted = (scores[filter_rows, filter_cols] >= target_score[filter_rows, 0]).long()
    ranks = ranks - torch.zeros_like(ranks).index_add_(0, filter_rows, counted)
    if head is None:
        return ranks
    head_filtered = torch.zeros_like(ranks).index_add_(0, filter_rows, (filter_cols == head[filter_rows]).long())
    head_counted = (scores.gather(1, head.unsqueeze(1)).squeeze(1) >= target_score.squeeze(1)) & (head != target)
    return ranks, ranks - (head_counted & (head_filtered == 0)).long()


class LorentzKGModule(StopOnNonFinite, L.LightningModule):
    """HyboNet KG scorer trained on ``(h, r, [t, negatives...])`` batches from a KG DataModule.

    The entity and relation counts come from the datamodule (``trainer.datamodule.num_entities`` and
    ``num_relations``) when not given, so a recipe needs no dataset sizes. Validation and test log
    filtered ``mrr`` and ``hits@{1,3,10}`` over both prediction directions (reverse relations), and the
    same under HyboNet's evaluation (``hybonet_mrr``, ``hybonet_hits@{1,3,10}``), whose filter also
    removes the query's head entity from the candidates (its published numbers use it).

    Args:
        num_entities: entity count (taken from the datamodule when None).
        num_relations: relation count, reverse relations included (taken from the datamodule when None).
        dim: coordinates of each entity point, time coordinate included.
        k: the hyperboloid's ``-<x,x>_L`` (curvature ``-1/k``).
        max_norm: entities' space norm is clipped to this whenever the optimiser re-projects them.
        max_scale: the transformed head's time coordinate lies in ``[1.1 sqrt(k), 1.1 sqrt(k) + max_scale]``.
        margin: constant added to every score (``margin - 2k - d_L^2 + biases``), the BCE decision offset.
        lr: learning rate of RiemannianAdam (:class:`~lightning_grendel.hyperbolic.optim.LorentzRiemannianAdam`).
        stabilize: RiemannianAdam projects parameters back onto their manifold every this many steps (None: never).
        retraction: optimiser step on the hyperboloid: ``"expmap"`` (exact map and parallel transport) or
            ``"projection"`` (``projx(x + u)``, cheaper, applies ``max_norm`` every step).
        lr_schedule: ``"constant"`` (HyboNet's), ``"plateau"`` (multiply the rate by ``lr_decay`` once
            ``val/mrr`` has not improved for ``lr_patience`` validations; it needs epoch-wise validation) or
            ``"cosine"`` (from ``lr`` down to ``min_lr`` over ``trainer.max_epochs``) or ``"step"`` (multiply
            the rate by ``lr_decay`` at each epoch of ``lr_milestones``).
        lr_decay: the plateau and step schedules' factor.
        lr_patience: validations without a better ``val/mrr`` before the plateau schedule decays the rate.
        min_lr: the rate never goes below this (plateau and cosine).
        lr_milestones: epochs at which the step schedule decays the rate.
    """

    def __init__(self, num_entities: int | None = None, num_relations: int | None = None, dim: int = 32,
                 k: float = 1.0, max_norm: float = 1.5, max_scale: float = 3.5, margin: float = 8.0,
                 lr: float = 0.005, stabilize: int | None = 1,
                 retraction: Literal["expmap", "projection"] = "expmap",
                 lr_schedule: Literal["constant", "plateau", "cosine", "step"] = "constant", lr_decay: float = 0.2,
                 lr_patience: int = 3, min_lr: float = 1e-5, lr_milestones: list[int] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: HyboNetKG | None = None
        self._ranks: list[tuple[Tensor, Tensor]] = []
        if num_entities is not None and num_relations is not None:
            self._build(num_entities, num_relations)

    def _build(self, num_entities: int, num_relations: int) -> None:
        hp = self.hparams
        self.hparams.update(num_entities=num_entities, num_relations=num_relations)
        self.model = HyboNetKG(num_entities, num_relations, hp.dim, hp.k, hp.max_norm, hp.max_scale, hp.margin,
                               hp.retraction)

    def setup(self, stage: str) -> None:
        if self.model is None:
            dm = self.trainer.datamodule
            self._build(dm.num_entities, dm.num_relations)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        scores = self.model(batch["head"], batch["relation"], batch["tails"])
        targets = torch.zeros_like(scores)
        targets[:, 0] = 1.0
        loss = F.binary_cross_entropy_with_logits(scores, targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=scores.shape[0])
        return loss

    def _eval_step(self, batch: dict[str, Tensor]) -> None:
        scores = self.model.score_all(batch["head"], batch["relation"])
        self._ranks.append(filtered_ranks(scores, batch["tail"], batch["filter_rows"], batch["filter_cols"],
                                          batch["head"]))

    def _eval_epoch_end(self, prefix: str) -> None:
        standard, hybonet = (torch.cat(r).double() for r in zip(*self._ranks, strict=True))
        self._ranks.clear()
        for name, ranks in (("", standard), ("hybonet_", hybonet)):
            self.log(f"{prefix}/{name}mrr", (1.0 / ranks).mean(), prog_bar=not name)
            for n in (1, 3, 10):
                self.log(f"{prefix}/{name}hits@{n}", (ranks <= n).double().mean())

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self) -> torch.optim.Optimizer | dict:
        hp = self.hparams
        optimizer = LorentzRiemannianAdam(self.parameters(), lr=hp.lr, stabilize=hp.stabilize)
        if hp.lr_schedule == "constant":
            return optimizer
        if hp.lr_schedule == "step":
            if not hp.lr_milestones:
                raise ValueError("lr_schedule='step' decays the rate at --model.lr_milestones: give at least one epoch")
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, hp.lr_milestones, hp.lr_decay)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        if hp.lr_schedule == "cosine":
            if self.trainer.max_epochs is None or self.trainer.max_epochs < 1:
                raise ValueError("lr_schedule='cosine' anneals over trainer.max_epochs: set --trainer.max_epochs")
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.trainer.max_epochs, hp.min_lr)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        every = self.trainer.check_val_every_n_epoch
        if every is None:
            raise ValueError("lr_schedule='plateau' steps after each validation, so it needs "
                             "--trainer.check_val_every_n_epoch (validation counted in steps is not supported)")
        # Stepped on the epochs that validate, so `patience` counts validations, not epochs.
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=hp.lr_decay,
                                                               patience=hp.lr_patience, min_lr=hp.min_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/mrr",
                                                         "interval": "epoch", "frequency": every}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Norm clipping at full precision goes through :func:`~lightning_grendel.hyperbolic.clip.clip_grad_norm_`
        (torch's result, without a pass over the entity table's gradient while the norm is within the limit);
        anything else through Lightning."""
        plain = type(self.trainer.precision_plugin) is Precision and gradient_clip_algorithm in (None, "norm")
        if gradient_clip_val and plain:
            clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

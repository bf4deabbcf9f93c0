"""The KG module's learning-rate schedules, against the rule each one states, on a toy graph."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest

from lightning_grendel.hyperbolic.data.knowledge_graph import KnowledgeGraphDataModule
from lightning_grendel.hyperbolic.modules.kg import LorentzKGModule
from tests.hyperbolic.data.test_knowledge_graph import write_graph


class RecordRates(L.Callback):
    """The rate each epoch trains with and the ``val/mrr`` of each validation, by epoch."""

    def __init__(self) -> None:
        self.rates: dict[int, float] = {}
        self.mrr: dict[int, float] = {}

    def on_train_epoch_start(self, trainer, module) -> None:
        self.rates[trainer.current_epoch] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_validation_end(self, trainer, module) -> None:  # after the module has logged
        if not trainer.sanity_checking:
            self.mrr[trainer.current_epoch] = trainer.callback_metrics["val/mrr"].item()


def fit(tmp_path, epochs: int, every: int | None, **schedule) -> RecordRates:
    L.seed_everything(0, verbose=False)
    rng = np.random.default_rng(0)
    ents = [f"e{i}" for i in range(30)]
    train = [(ents[i], "next", ents[(i + 1) % 30]) for i in range(30)]
    rng.shuffle(train)
    dm = KnowledgeGraphDataModule(str(write_graph(tmp_path, train=train, valid=train[:8], test=train[8:12])),
                                  batch_size=10, num_negatives=4)
    module = LorentzKGModule(dim=4, lr=0.05, margin=2.0, **schedule)
    record = RecordRates()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, check_val_every_n_epoch=every,
                        num_sanity_val_steps=0, callbacks=[record])
    trainer.fit(module, dm)
    return record


def test_plateau_decays_after_patience_validations_without_a_better_mrr(tmp_path):
    record = fit(tmp_path, epochs=24, every=2, lr_schedule="plateau", lr_decay=0.5, lr_patience=1, min_lr=0.01)
    rate, best, bad, expected = 0.05, -math.inf, 0, {}
    for epoch in range(24):
        expected[epoch] = rate
        if epoch in record.mrr:  # the stated rule, replayed on the logged validations
            better = record.mrr[epoch] > best * (1 + 1e-4)
            best, bad = (record.mrr[epoch], 0) if better else (best, bad + 1)
            if bad > 1:
                rate, bad = max(rate * 0.5, 0.01), 0
    assert sorted(record.mrr) == list(range(1, 24, 2))
    assert record.rates == pytest.approx(expected, rel=1e-12)
    assert min(record.rates.values()) < 0.05, record.mrr  # the toy graph plateaus, so the rule fired


def test_cosine_anneals_to_min_lr_over_max_epochs(tmp_path):
    record = fit(tmp_path, epochs=6, every=1, lr_schedule="cosine", min_lr=0.001)
    expected = {e: 0.001 + (0.05 - 0.001) * (1 + math.cos(math.pi * e / 6)) / 2 for e in range(6)}
    assert record.rates == pytest.approx(expected, rel=1e-9)


def test_step_decays_at_each_milestone(tmp_path):
    record = fit(tmp_path, epochs=6, every=1, lr_schedule="step", lr_milestones=[2, 4], lr_decay=0.5)
    assert record.rates == pytest.approx({0: 0.05, 1: 0.05, 2: 0.025, 3: 0.025, 4: 0.0125, 5: 0.0125}, rel=1e-12)


def test_plateau_without_epoch_validation_is_refused(tmp_path):
    module = LorentzKGModule(num_entities=5, num_relations=2, dim=4, lr_schedule="plateau")
    module.trainer = L.Trainer(check_val_every_n_epoch=None, val_check_interval=10, logger=False)
    with pytest.raises(ValueError, match="check_val_every_n_epoch"):
        module.configure_optimizers()
    with pytest.raises(ValueError, match="lr_milestones"):
        LorentzKGModule(num_entities=5, num_relations=2, dim=4, lr_schedule="step").configure_optimizers()

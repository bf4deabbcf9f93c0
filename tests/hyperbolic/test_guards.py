"""Lorentz modules stop at a non-finite loss or parameter (no checkpoint after it); WN18RR files with a
UTF-8 byte-order mark are read without a phantom entity."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_grendel.hyperbolic.data.knowledge_graph import KnowledgeGraph, KnowledgeGraphDataModule
from lightning_grendel.hyperbolic.modules.finite import NonFiniteTrainingError
from lightning_grendel.hyperbolic.modules.kg import LorentzKGModule

TRAIN = [(f"e{i}", "next", f"e{(i + 1) % 12}") for i in range(12)]


def write_graph(path, bom: bool = False):
    for name, rows in (("train", TRAIN), ("valid", TRAIN[:2]), ("test", TRAIN[2:4])):
        text = "".join("\t".join(r) + "\n" for r in rows)
        (path / f"{name}.txt").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def test_a_byte_order_mark_adds_no_phantom_entity(tmp_path):
    plain = KnowledgeGraph.load(write_graph(tmp_path))
    (tmp_path / "bom").mkdir()
    marked = KnowledgeGraph.load(write_graph(tmp_path / "bom", bom=True))
    assert marked.entities == plain.entities and len(marked.entities) == 12
    assert (marked.train == plain.train).all()


class _PoisonAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                module.model.entity[:3] = float("nan")  # NaN entities give NaN scores and a NaN loss


def _fit(tmp_path, callback):
    module = LorentzKGModule(dim=8, lr=0.01)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[checkpoints, callback],
                        default_root_dir=tmp_path)
    trainer.fit(module, KnowledgeGraphDataModule(str(write_graph(tmp_path)), batch_size=4, num_negatives=4))


@pytest.mark.timeout(60)
def test_a_nan_loss_stops_before_backward_and_no_checkpoint_follows(tmp_path):
    with pytest.raises(NonFiniteTrainingError, match=r"LorentzKGModule: the training loss is nan at optimiser step 3"):
        _fit(tmp_path, _PoisonAt(2))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"]


class _InfiniteStep(L.Callback):
    def on_before_optimizer_step(self, trainer, module, optimizer):
        if trainer.global_step == 1:  # a finite loss, then an infinite gradient for two entities' rows
            module.model.entity.grad[:2, 1] = float("inf")


@pytest.mark.timeout(60)
def test_non_finite_parameters_after_a_step_are_named(tmp_path):
    pattern = r"non-finite parameters after optimiser step 2 \(model\.entity: 2 rows\)"
    with pytest.raises(NonFiniteTrainingError, match=pattern):
        _fit(tmp_path, _InfiniteStep())
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0-step=1.ckpt"]


def test_an_empty_parameter_is_not_reported():
    """Under PipelineStrategy another stage's parameters are empty on this rank; the check skips them."""
    from lightning_grendel.hyperbolic.modules.finite import _bad_rows

    assert _bad_rows(torch.empty(0)) == 0
    assert _bad_rows(torch.tensor([[1.0, float("nan")], [0.0, 1.0]])) == 1

"""Generated sequence tasks and the Lorentz transformer models / LightningModule."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from lightning_grendel.hyperbolic.data.sequences import PAD, SequenceTaskDataModule, bracket_depth_data, reverse_data
from lightning_grendel.hyperbolic.modules.transformer import LorentzTransformerModule
from lightning_grendel.hyperbolic.nets.seq import LorentzSeq2Seq, LorentzSequenceClassifier


def test_generated_data_is_correct():
    rng = np.random.default_rng(0)
    tokens, labels = bracket_depth_data(200, 12, 4, rng)
    for seq, label in zip(tokens.tolist(), labels.tolist(), strict=True):
        depth, best = 0, 0
        for t in seq:
            if t == PAD:
                break
            depth += 1 if t == 2 else -1
            assert depth >= 0
            best = max(best, depth)
        assert depth == 0 and label == min(best, 4) - 1
    assert set(labels.tolist()) == {0, 1, 2, 3}
    src, tgt = reverse_data(50, 8, 5, rng)
    for s, t in zip(src.tolist(), tgt.tolist(), strict=True):
        n = sum(x != PAD for x in s)
        assert t[:n] == s[:n][::-1] and all(x == PAD for x in t[n:])
    with pytest.raises(ValueError, match="task"):
        SequenceTaskDataModule(task="sort")


def test_padding_does_not_change_the_classifier_output():
    torch.manual_seed(0)
    model = LorentzSequenceClassifier(6, 3, d_model=8, max_len=10).eval()
    x = torch.tensor([[2, 3, 2, 3, 0, 0]])
    padded = x.clone()
    padded[0, 4:] = 5  # garbage behind the mask
    pad = x == 0
    torch.testing.assert_close(model(x, pad), model(padded, pad))


def test_seq2seq_generate_matches_teacher_forcing_on_its_own_output():
    torch.manual_seed(0)
    model = LorentzSeq2Seq(7, d_model=8, max_len=10).eval()
    src = torch.randint(2, 7, (3, 5))
    pad = torch.zeros_like(src, dtype=torch.bool)
    out = model.generate(src, pad, 5, bos=1)
    tgt_in = torch.cat([torch.ones(3, 1, dtype=torch.long), out[:, :-1]], dim=1)
    torch.testing.assert_close(model(src, pad, tgt_in).argmax(-1), out)


@pytest.mark.parametrize(("task", "data_task", "metric", "threshold"),
                         [("classify", "depth", "test/acc", 0.6), ("seq2seq", "reverse", "test/token_acc", 0.5)])
def test_module_learns(task, data_task, metric, threshold):
    L.seed_everything(0)
    dm = SequenceTaskDataModule(task=data_task, num_train=600, num_val=64, num_test=128, max_len=6,
                                num_symbols=4, batch_size=32)
    module = LorentzTransformerModule(task=task, d_model=16, lr=0.01)
    trainer = L.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    result = trainer.test(module, dm, verbose=False)[0]
    assert result[metric] > threshold, result  # chance: 0.25 for both

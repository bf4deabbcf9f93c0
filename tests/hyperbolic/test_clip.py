"""``clip_grad_norm_`` gives torch's gradients and norm bit for bit; the KG module's fit clips through it."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from lightning_grendel.hyperbolic import clip
from lightning_grendel.hyperbolic.data.knowledge_graph import KnowledgeGraphDataModule
from lightning_grendel.hyperbolic.modules.kg import LorentzKGModule


def _grads(scale: float, nan: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two identical sets of parameters with gradients of total norm about ``scale`` (one NaN if asked)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, 3)) for n in (50, 7)]
    for p in params:
        p.grad = torch.randn_like(p) * scale / 13
    if nan:
        params[1].grad[2, 1] = float("nan")
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, c in zip(params, copies, strict=True):
        c.grad = p.grad.clone()
    return params, copies


@pytest.mark.parametrize(("scale", "nan"), [(0.01, False), (0.9, False), (1e3, False), (1.0, True)])
def test_clip_equals_torch_bit_for_bit(scale, nan):
    ours, reference = _grads(scale, nan)
    before = [p.grad.data_ptr() for p in ours]
    norm = clip.clip_grad_norm_(ours, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(reference, 1.0)
    torch.testing.assert_close(norm, expected, rtol=0, atol=0, equal_nan=True)
    for p, r in zip(ours, reference, strict=True):
        torch.testing.assert_close(p.grad, r.grad, rtol=0, atol=0, equal_nan=True)
    assert [p.grad.data_ptr() for p in ours] == before  # clipped in place, or not touched at all


def test_clip_with_no_gradient_returns_zero():
    assert clip.clip_grad_norm_([torch.nn.Parameter(torch.ones(2))], 1.0).item() == 0.0


class _LightningClipping(LorentzKGModule):
    """The same module with Lightning's own clipping (torch's clip_grad_norm_), the reference."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        L.LightningModule.configure_gradient_clipping(self, optimizer, gradient_clip_val, gradient_clip_algorithm)


@pytest.mark.parametrize("clip_val", [100.0, 1.0, 0.02])  # clips no step, some steps, most steps
def test_module_fit_equals_lightning_clipping(tmp_path, monkeypatch, clip_val):
    rng = np.random.default_rng(0)
    ents = [f"e{i}" for i in range(30)]
    train = [(ents[i], "next", ents[(i + 1) % 30]) for i in range(30)] + [(ents[i], "two", ents[(i + 2) % 30])
                                                                          for i in range(0, 30, 3)]
    rng.shuffle(train)
    for name, rows in (("train", train), ("valid", train[:4]), ("test", train[4:8])):
        (tmp_path / f"{name}.txt").write_text("".join("\t".join(r) + "\n" for r in rows))
    norms = []

    def recorded(*args, _clip=clip.clip_grad_norm_):
        norms.append(_clip(*args).item())
        return norms[-1]

    monkeypatch.setattr("lightning_grendel.hyperbolic.modules.kg.clip_grad_norm_", recorded)
    tables = []
    for module_class in (LorentzKGModule, _LightningClipping):
        L.seed_everything(3, verbose=False)
        module = module_class(dim=8, lr=0.05, margin=2.0)
        trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=clip_val,
                            limit_val_batches=0)
        trainer.fit(module, KnowledgeGraphDataModule(str(tmp_path), batch_size=8, num_negatives=4, seed=3))
        tables.append([p.detach().clone() for p in module.parameters()])
    assert len(norms) == 3 * 10  # every step of the module's fit (40 triples and their reverses, 8 a batch)
    assert any(n > clip_val for n in norms) == (clip_val < 100)  # the clipping path ran (and the skipping one)
    for ours, reference in zip(*tables, strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)

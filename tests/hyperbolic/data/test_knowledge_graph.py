"""KG triples reader, filters, negatives, the HyboNet scorer and the LightningModule on tiny graphs."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from lightning_grendel.hyperbolic.data.knowledge_graph import KnowledgeGraph, KnowledgeGraphDataModule, read_triples
from lightning_grendel.hyperbolic.modules.kg import LorentzKGModule, filtered_ranks
from lightning_grendel.hyperbolic.nets.kg import HyboNetKG
from tests.helpers.hyperbolic import assert_on_hyperboloid

TRAIN = [("a", "r1", "b"), ("a", "r1", "c"), ("b", "r2", "c"), ("c", "r1", "d"), ("d", "r2", "a")]


def write_graph(path, train=TRAIN, valid=(("a", "r2", "d"),), test=(("b", "r1", "d"), ("e", "r1", "a"))):
    for name, rows in (("train", train), ("valid", valid), ("test", test)):
        (path / f"{name}.txt").write_text("".join("\t".join(r) + "\n" for r in rows))
    return path


def test_malformed_line_names_file_and_line(tmp_path):
    write_graph(tmp_path)
    with (tmp_path / "train.txt").open("a") as f:
        f.write("\n")  # blank lines are fine
        f.write("x\tr1\n")
    with pytest.raises(ValueError, match=r"train\.txt:7: expected 3 tab-separated fields"):
        read_triples(tmp_path / "train.txt")
    with pytest.raises(ValueError, match=r"train\.txt:7"):
        KnowledgeGraph.load(tmp_path)
    (tmp_path / "valid.txt").unlink()
    with pytest.raises(FileNotFoundError, match="valid.txt"):
        KnowledgeGraph.load(tmp_path)


def test_reverse_relations_and_unseen_entities(tmp_path):
    g = KnowledgeGraph.load(write_graph(tmp_path))
    # "e" occurs only in test: kept in the vocabulary (standard), ranked with an untrained embedding
    assert "e" in g.entities and g.num_entities == 5 and g.num_relations == 4
    assert len(g.train) == 2 * len(TRAIN) and len(g.test) == 4
    fwd, rev = g.train[: len(TRAIN)], g.train[len(TRAIN):]
    np.testing.assert_array_equal(rev, np.stack([fwd[:, 2], fwd[:, 1] + 2, fwd[:, 0]], axis=1))
    dropped = KnowledgeGraph.load(tmp_path, drop_unseen=True)
    assert dropped.num_dropped == 1 and "e" not in dropped.entities and len(dropped.test) == 2


def test_filters_and_negatives_are_consistent(tmp_path):
    dm = KnowledgeGraphDataModule(str(write_graph(tmp_path)), batch_size=4, num_negatives=3)
    g, tt = dm.graph, dm.true_tails
    e, r = {x: i for i, x in enumerate(g.entities)}, {x: i for i, x in enumerate(g.relations)}
    # query (a, r1, ?) with target b: the other true tail c (from train) must be filtered, b not
    rows, cols = tt.filter_coo(np.array([e["a"]]), np.array([r["r1"]]), np.array([e["b"]]))
    assert cols.tolist() == [e["c"]] and rows.tolist() == [0]
    # (b, r1, d) is a test fact: filtered for the valid query (b, r1, ?) too
    assert tt.contains(np.array([e["b"]]), np.array([r["r1"]]), np.array([e["d"]])).all()
    for batch in dm.train_dataloader():
        negatives = batch["tails"][:, 1:].numpy()
        heads = np.repeat(batch["head"].numpy()[:, None], 3, 1)
        rels = np.repeat(batch["relation"].numpy()[:, None], 3, 1)
        assert not tt.contains(heads, rels, negatives).any()


def test_filtered_ranks_against_a_loop():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 20, generator=g)
    target = torch.randint(0, 20, (6,), generator=g)
    rows = torch.tensor([0, 0, 3, 5])
    cols = torch.tensor([1, 2, 7, 19])
    cols = torch.where(cols == target[rows], (cols + 1) % 20, cols)
    ranks = filtered_ranks(scores, target, rows, cols)
    for i in range(6):
        removed = set(cols[rows == i].tolist())
        better = [j for j in range(20) if j not in removed and j != target[i] and scores[i, j] >= scores[i, target[i]]]
        assert ranks[i].item() == 1 + len(better)


def test_hybonet_ranks_also_remove_the_head_like_its_loop():
    """HyboNet's evaluation loop: filtered tails and the head set to -inf, the target's score put back."""
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(40, 12, generator=g).round(decimals=1)  # ties happen
    target = torch.randint(0, 12, (40,), generator=g)
    head = torch.randint(0, 12, (40,), generator=g)
    head[:5] = target[:5]  # a head that is its own target stays
    pairs = torch.unique(torch.arange(40).repeat_interleave(3) * 12 + torch.randint(0, 12, (120,), generator=g))
    rows, cols = pairs // 12, pairs % 12  # each (query, entity) once, as filter_coo gives them
    cols[:4] = head[rows[:4]]  # some heads are known tails (filtered anyway)
    keep = cols != target[rows]
    rows, cols = rows[keep], cols[keep]
    pairs = torch.unique(rows * 12 + cols)
    rows, cols = pairs // 12, pairs % 12
    standard, hybonet = filtered_ranks(scores, target, rows, cols, head)
    torch.testing.assert_close(standard, filtered_ranks(scores, target, rows, cols))
    for i in range(40):
        row = scores[i].clone()
        value = row[target[i]].item()
        row[cols[rows == i]] = float("-inf")
        row[head[i]] = float("-inf")
        row[target[i]] = value
        assert hybonet[i].item() == (row >= value).sum().item()


def test_scorer_matches_hybonets_formula():
    """Time from the relation map alone, the relation bias added to the space part only (HyboNet's KG
    lorentz_linear), written out independently in float64."""
    torch.manual_seed(0)
    model = HyboNetKG(30, 4, dim=8, k=1.0, max_scale=3.5, margin=8.0).double()
    with torch.no_grad():
        model.relation_bias.normal_()
        model.bias_head.normal_()
        model.bias_tail.normal_()
    head, rel = torch.tensor([0, 5, 7]), torch.tensor([0, 3, 1])
    tails = torch.tensor([[1, 2], [3, 4], [29, 0]])
    x = model.entity.detach()[head]
    z = (model.relation_transform.detach()[rel] @ x.unsqueeze(-1)).squeeze(-1)
    time = torch.sigmoid(z[:, :1]) * 3.5 + 1.1
    space = z[:, 1:] + model.relation_bias.detach()[rel]
    space = space * torch.sqrt((time * time - 1.0) / (space * space).sum(-1, keepdim=True))
    mapped = torch.cat([time, space], -1)
    t = model.entity.detach()[tails]
    inner = (mapped.unsqueeze(1) * t)[..., 1:].sum(-1) - mapped[:, None, 0] * t[..., 0]
    expected = 8.0 + 2.0 * inner + model.bias_head.detach()[head].unsqueeze(-1) + model.bias_tail.detach()[tails]
    torch.testing.assert_close(model(head, rel, tails).detach(), expected)


def test_scorer_consistency():
    torch.manual_seed(0)
    model = HyboNetKG(30, 4, dim=8, k=2.0)
    head, rel = torch.tensor([0, 5, 7]), torch.tensor([0, 3, 1])
    tails = torch.tensor([[1, 2], [3, 4], [29, 0]])
    assert_on_hyperboloid(model.transform(head, rel), 2.0)
    torch.testing.assert_close(model(head, rel, tails), model.score_all(head, rel).gather(1, tails))


def test_module_learns_a_tiny_graph(tmp_path):
    """A few epochs on a toy graph must rank training facts far better than chance."""
    rng = np.random.default_rng(0)
    ents = [f"e{i}" for i in range(40)]
    train = [(ents[i], "next", ents[(i + 1) % 40]) for i in range(40)]
    train += [(ents[i], "skip", ents[(i + 2) % 40]) for i in range(0, 40, 2)]
    rng.shuffle(train)
    path = write_graph(tmp_path, train=train, valid=train[:8], test=train[8:16])
    dm = KnowledgeGraphDataModule(str(path), batch_size=16, num_negatives=8)
    module = LorentzKGModule(dim=8, lr=0.05, margin=2.0)
    trainer = L.Trainer(max_epochs=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0)
    trainer.fit(module, dm)
    result = trainer.test(module, dm, verbose=False)[0]
    assert result["test/mrr"] > 0.3  # chance level is ~0.1 with 40 entities
    assert torch.isfinite(module.model.entity).all()
    assert_on_hyperboloid(module.model.entity.detach(), 1.0)


def test_wn18rr_smoke(shared_dataset):
    """Real WN18RR: loads (40943 entities, 11 relations), a few steps on a tiny subset run."""
    path = shared_dataset("wn18rr")
    dm = KnowledgeGraphDataModule(str(path), batch_size=64, num_negatives=5, train_fraction=0.002,
                                  eval_batch_size=64)
    assert dm.num_entities == 40943 and dm.num_relations == 22
    module = LorentzKGModule(dim=8, retraction="projection", stabilize=None)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        limit_test_batches=1)
    trainer.fit(module, dm)
    assert 0.0 <= trainer.callback_metrics["val/mrr"].item() <= 1.0

"""Planetoid loading: restricted unpickler (malicious pickles refused), clear errors, the GCN model."""

from __future__ import annotations

import collections
import os
import pickle
import shutil

import lightning as L
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from lightning_grendel.hyperbolic.data.planetoid import (
    Planetoid,
    PlanetoidDataModule,
    normalized_adjacency,
    restricted_load,
    split_edges,
)
from lightning_grendel.hyperbolic.manifold import LorentzManifold
from lightning_grendel.hyperbolic.modules.gcn import LorentzGCNLinkModule, LorentzGCNModule
from lightning_grendel.hyperbolic.nets.gcn import HyboNetGCN, LorentzGraphConv
from tests.helpers.hyperbolic import KS, assert_on_hyperboloid, random_points


class _RunsCommand:
    """Pickles to ``os.system(...)``: plain pickle.load would execute the command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_planetoid(path, n_train=4, n_test=3, n_other=3, n_feat=5, n_cls=2, name="toy"):
    """A tiny, valid Planetoid folder: nodes 0..n-1, a ring graph, test nodes listed shuffled; the first
    ``n_cls`` features are the one-hot label (so the labels are learnable)."""
    rng = np.random.default_rng(0)
    n_all = n_train + n_other
    n = n_all + n_test
    onehot = lambda k: np.eye(n_cls)[rng.integers(0, n_cls, k)]  # noqa: E731
    feats = lambda k: sp.csr_matrix(rng.integers(0, 2, (k, n_feat)).astype(np.float32))  # noqa: E731
    ally, ty = onehot(n_all), onehot(n_test)
    allx = sp.csr_matrix(np.hstack([ally, feats(n_all).toarray()[:, n_cls:]]).astype(np.float32))
    tx = sp.csr_matrix(np.hstack([ty, feats(n_test).toarray()[:, n_cls:]]).astype(np.float32))
    objs = {"x": allx[:n_train], "y": ally[:n_train], "allx": allx, "ally": ally, "tx": tx, "ty": ty,
            "graph": collections.defaultdict(list, {i: [(i + 1) % n] for i in range(n)})}
    for key, obj in objs.items():
        (path / f"ind.{name}.{key}").write_bytes(pickle.dumps(obj, protocol=2))
    (path / f"ind.{name}.test.index").write_text("\n".join(str(i) for i in rng.permutation(np.arange(n_all, n))))
    return path


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "ind.toy.graph"
    bad.write_bytes(pickle.dumps(_RunsCommand(marker)))
    with pytest.raises(pickle.UnpicklingError, match=r"ind\.toy\.graph.*refusing to load global .*system"):
        restricted_load(bad)
    assert not marker.exists()
    # the same file inside a dataset folder is refused when the dataset loads
    write_planetoid(tmp_path)
    bad.write_bytes(pickle.dumps({"a": [_RunsCommand(marker)]}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        Planetoid.load(tmp_path, "toy")
    assert not marker.exists()
    for evil in (b"cbuiltins\neval\n(S'1+1'\ntR.", b"csubprocess\ncall\n(S'true'\ntR."):
        bad.write_bytes(evil)
        with pytest.raises(pickle.UnpicklingError, match="refusing"):
            restricted_load(bad)


def test_wrong_files_give_clear_errors(tmp_path):
    write_planetoid(tmp_path)
    g = Planetoid.load(tmp_path, "toy")
    assert g.features.shape == (10, 5) and g.adjacency.shape == (10, 10) and len(g.idx_test) == 3
    (tmp_path / "ind.toy.ty").write_bytes(pickle.dumps(np.eye(2)[:2], protocol=2))
    with pytest.raises(ValueError, match=r"ind\.toy\.tx has 3 rows but .*ind\.toy\.ty has 2"):
        Planetoid.load(tmp_path, "toy")
    write_planetoid(tmp_path)
    (tmp_path / "ind.toy.x").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(ValueError, match=r"ind\.toy\.x: expected a scipy sparse feature matrix"):
        Planetoid.load(tmp_path, "toy")
    write_planetoid(tmp_path)
    (tmp_path / "ind.toy.allx").write_bytes(b"this is not a pickle")
    with pytest.raises((ValueError, pickle.UnpicklingError), match=r"ind\.toy\.allx"):
        Planetoid.load(tmp_path, "toy")
    write_planetoid(tmp_path)
    (tmp_path / "ind.toy.test.index").write_text("7\neight\n9\n")
    with pytest.raises(ValueError, match=r"test\.index: expected one integer per line"):
        Planetoid.load(tmp_path, "toy")
    (tmp_path / "ind.toy.graph").unlink()
    with pytest.raises(FileNotFoundError, match=r"ind\.toy\.graph"):
        Planetoid.load(tmp_path, "toy")


def test_test_rows_are_reordered_like_the_reference(tmp_path):
    """Row i of tx belongs to node test.index[i]: after loading, features[test.index[i]] == tx[i]."""
    write_planetoid(tmp_path)
    tx = restricted_load(tmp_path / "ind.toy.tx").toarray()
    order = [int(s) for s in (tmp_path / "ind.toy.test.index").read_text().split()]
    g = Planetoid.load(tmp_path, "toy")
    np.testing.assert_array_equal(g.features[order], tx)
    assert (g.adjacency != g.adjacency.T).nnz == 0 and g.adjacency.diagonal().sum() == 0


@pytest.mark.parametrize("k", KS)
def test_graph_conv_outputs_on_manifold(k):
    torch.manual_seed(0)
    m = LorentzManifold(k)
    conv = LorentzGraphConv(m, 6, 5, dropout=0.2).double()
    assert_on_hyperboloid(conv(random_points(7, 6, k, torch.float64), torch.eye(7, dtype=torch.float64)), k)
    conv.eval()
    x = random_points(7, 6, k, torch.float64, spread=30.0)
    adj = torch.rand(7, 7, dtype=torch.float64) * (torch.rand(7, 7) > 0.5) + torch.eye(7, dtype=torch.float64)
    out = conv(x, adj)
    assert_on_hyperboloid(out, k)
    torch.testing.assert_close(conv(x, adj.to_sparse()), out)
    model = HyboNetGCN(6, 4, 3, num_layers=3, k=k, nonlin="relu").double()
    assert_on_hyperboloid(model.encode(torch.rand(7, 6, dtype=torch.float64), adj), k)


def test_gcn_module_fits_a_toy_graph(tmp_path):
    write_planetoid(tmp_path, n_train=20, n_other=20, n_test=10, n_feat=8, n_cls=2)
    dm = PlanetoidDataModule(str(tmp_path), name="toy")
    module = LorentzGCNModule(hidden=8, num_layers=1, dropout=0.0, lr=0.05, weight_decay=0.0)
    trainer = L.Trainer(max_epochs=60, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    assert trainer.callback_metrics["train/acc"] >= 0.9  # memorises 20 labelled nodes


def test_cora_loads_with_the_standard_split(shared_dataset):
    path = shared_dataset("cora")
    dst = PlanetoidDataModule(str(path))
    g = dst.graph
    assert g.features.shape == (2708, 1433) and dst.num_classes == 7
    assert g.adjacency.nnz == 10556  # 5278 undirected edges, no self loops
    assert len(g.idx_train) == 140 and len(g.idx_val) == 500 and len(g.idx_test) == 1000
    assert np.bincount(g.labels[g.idx_train]).tolist() == [20] * 7


def test_copied_cora_with_a_swapped_file_fails(shared_dataset, tmp_path):
    path = shared_dataset("cora")
    for f in path.iterdir():
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(path / "ind.cora.y", tmp_path / "ind.cora.ty")
    with pytest.raises(ValueError, match="rows but"):
        Planetoid.load(tmp_path)


def test_edge_split_is_disjoint_and_link_module_learns(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    blocks = rng.integers(0, 3, n)  # three communities: edges mostly inside a community
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)
             if rng.random() < (0.3 if blocks[i] == blocks[j] else 0.01)]
    adj = sp.coo_matrix((np.ones(len(pairs)), tuple(np.array(pairs).T)), shape=(n, n))
    adj = ((adj + adj.T) > 0).astype(np.float32).tocsr()
    split = split_edges(adj, 0.1, 0.2, seed=0)
    pos = {tuple(e) for key in ("train_pos", "val_pos", "test_pos") for e in split[key].tolist()}
    assert len(pos) == adj.nnz // 2
    for key in ("val_neg", "test_neg"):
        assert not ({tuple(e) for e in split[key].tolist()} & pos)
        assert len(split[key]) == len(split[key.replace("neg", "pos")])

    write_planetoid(tmp_path, n_train=20, n_other=30, n_test=10, n_feat=6, n_cls=3)
    dm = PlanetoidDataModule(str(tmp_path), name="toy", link_prediction=True)
    communities = torch.from_numpy(np.eye(3)[blocks].astype(np.float32))
    dm.batch["features"] = torch.cat([communities, torch.rand(n, 3)], dim=1)  # features that predict links
    s = split_edges(adj, 0.1, 0.2, seed=0)
    dm.batch.update({key: torch.from_numpy(v) for key, v in s.items()})
    train = s["train_pos"]
    dm.batch["adjacency"] = normalized_adjacency(
        sp.coo_matrix((np.ones(len(train), dtype=np.float32), tuple(train.T)), shape=(n, n)).tocsr())
    module = LorentzGCNLinkModule(hidden=8, dropout=0.0, lr=0.02)
    trainer = L.Trainer(max_epochs=60, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    assert trainer.test(module, dm, verbose=False)[0]["test/roc_auc"] > 0.7  # chance: 0.5

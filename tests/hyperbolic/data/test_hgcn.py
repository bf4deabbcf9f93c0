"""HGCN-layout loading (header or not, malformed files named), splits, and the Disease-like generator."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from lightning_grendel.hyperbolic.data.disease import generate_disease_like, write_hgcn_folder
from lightning_grendel.hyperbolic.data.hgcn import HGCNDataModule, HGCNGraph, node_split


@pytest.fixture
def tree(tmp_path):
    data = generate_disease_like(depth=3, branching=3.0, seed=1)
    return write_hgcn_folder(tmp_path / "disease_lp", data), data


@pytest.mark.timeout(30)
def test_generator_is_a_tree_with_hierarchical_position():
    data = generate_disease_like(depth=3, branching=3.0, seed=2)
    n = len(data.features)
    assert data.edges.shape == (n - 1, 2) and (data.edges[:, 0] < data.edges[:, 1]).all()  # parents first
    pos = data.features[:, -1]
    gap_edges = np.abs(pos[data.edges[:, 0]] - pos[data.edges[:, 1]]).mean()
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, n, (2000, 2))
    assert gap_edges < 0.5 * np.abs(pos[pairs[:, 0]] - pos[pairs[:, 1]]).mean()
    assert set(np.unique(data.labels)) <= {0, 1} and data.labels[0] == 1
    # a child is infected only if its parent is (the outbreak spreads down the tree)
    assert not ((data.labels[data.edges[:, 1]] == 1) & (data.labels[data.edges[:, 0]] == 0)).any()
    again = generate_disease_like(depth=3, branching=3.0, seed=2)
    assert np.array_equal(again.features, data.features)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("header", [False, True])
def test_round_trip_and_name_from_folder(tmp_path, header):
    data = generate_disease_like(depth=2, branching=3.0, seed=0)
    folder = write_hgcn_folder(tmp_path / "toy_lp", data, header=header)
    g = HGCNGraph.load(folder)
    assert g.name == "toy_lp"
    np.testing.assert_array_equal(g.features, data.features)
    np.testing.assert_array_equal(g.labels, data.labels)
    dense = g.adjacency.toarray()
    assert (dense == dense.T).all() and dense.sum() == 2 * len(data.edges) and np.trace(dense) == 0
    assert dense[data.edges[:, 0], data.edges[:, 1]].all()


@pytest.mark.timeout(30)
def test_malformed_files_are_named(tree):
    folder, _ = tree
    edges = folder / "disease_lp.edges.csv"
    good = edges.read_text()
    edges.write_text(good + "3;4\n")
    with pytest.raises(ValueError, match=r"disease_lp\.edges\.csv:\d+: expected 'id1,id2'"):
        HGCNGraph.load(folder)
    edges.write_text(good + "1,100000\n")
    with pytest.raises(ValueError, match=r"edges\.csv: node ids must lie in"):
        HGCNGraph.load(folder)
    edges.write_text(good)
    (folder / "disease_lp.feats.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"feats\.npz: not a scipy sparse matrix"):
        HGCNGraph.load(folder)
    sp.save_npz(folder / "disease_lp.feats.npz", sp.csr_matrix(np.ones((3, 2))))
    with pytest.raises(ValueError, match=r"labels\.npy: \d+ labels but .*feats\.npz has 3 rows"):
        HGCNGraph.load(folder)
    (folder / "disease_lp.labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match="missing disease_lp.labels.npy"):
        HGCNGraph.load(folder)
    with pytest.raises(FileNotFoundError, match="no such dataset folder"):
        HGCNGraph.load(folder / "nope")


@pytest.mark.timeout(30)
def test_pickled_labels_are_refused(tree):
    folder, data = tree
    np.save(folder / "disease_lp.labels.npy", np.array([{"a": 1}] * len(data.labels), dtype=object))
    with pytest.raises(ValueError, match=r"labels\.npy: not a numpy \.npy array"):
        HGCNGraph.load(folder)


@pytest.mark.timeout(30)
def test_link_prediction_split(tree):
    folder, data = tree
    dm = HGCNDataModule(str(folder), task="lp", seed=3)
    b = dm.batch
    n_edges = len(data.edges)
    assert len(b["val_pos"]) == int(0.05 * n_edges) and len(b["test_pos"]) == int(0.10 * n_edges)
    assert len(b["train_pos"]) + len(b["val_pos"]) + len(b["test_pos"]) == n_edges
    edge_set = {tuple(sorted(e)) for e in data.edges.tolist()}
    for key in ("val_neg", "test_neg"):
        assert not {tuple(sorted(e)) for e in b[key].tolist()} & edge_set
    # the training adjacency holds no held-out edge
    adj = b["adjacency"].to_dense()
    for i, j in b["test_pos"].tolist():
        assert adj[i, j] == 0 and adj[j, i] == 0
    assert dm.num_features == data.features.shape[1]


@pytest.mark.timeout(30)
def test_node_split_is_class_balanced():
    labels = np.array([1] * 30 + [0] * 70)
    train, val, test = node_split(labels, 0.1, 0.6, seed=0)
    assert len(val) == 6 and len(test) == 36 and labels[val].sum() == 3 and labels[test].sum() == 18
    assert len(np.intersect1d(train, np.concatenate([val, test]))) == 0 and len(train) + 42 == 100


@pytest.mark.timeout(30)
def test_nc_datamodule_and_degree_features(tree):
    folder, data = tree
    dm = HGCNDataModule(str(folder), task="nc", degree_features=True)
    assert dm.num_features == data.features.shape[1] + 7 and dm.num_classes == 2
    assert "train_pos" not in dm.batch
    with pytest.raises(ValueError, match="task must be"):
        HGCNDataModule(str(folder), task="xx")

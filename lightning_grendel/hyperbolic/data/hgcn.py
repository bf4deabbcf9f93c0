"""Graphs in HGCN's own layout (Disease, Airport): ``<name>.edges.csv``, ``<name>.feats.npz``, ``<name>.labels.npy``.

The dataset name is the folder's name: ``disease_lp/`` holds ``disease_lp.edges.csv`` (one ``id1,id2``
pair of integer node ids per line, an optional header line), ``disease_lp.feats.npz`` (a scipy sparse
matrix written by ``scipy.sparse.save_npz``, one row per node) and ``disease_lp.labels.npy`` (one
integer label per node). Nothing is unpickled: ``load_npz`` and ``np.load`` run with pickles refused.

Splits follow HGCN: link prediction holds out 5% / 10% of the undirected edges for validation / test
with as many sampled non-edges; node classification draws validation and test nodes class-balanced
(``label != 0`` against ``label == 0``) with HGCN's proportions for the dataset.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import scipy.sparse as sp
import torch

from lightning_grendel._recipes import require_data_path
from lightning_grendel.hyperbolic.data.planetoid import WholeGraphLoaders, normalized_adjacency, split_edges

# HGCN's node-classification proportions (validation, test) by dataset name; others get the first.
NC_SPLITS = {"disease_nc": (0.10, 0.60), "airport": (0.15, 0.15)}


def read_edges(path: Path) -> np.ndarray:
    """``(E, 2)`` int64 node-id pairs from a two-column CSV; a first line that is not two integers
    (``id1,id2``) is a header. Any other malformed line is an error naming the file and line."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a text CSV file ({err})") from err
    pairs = []
    for number, line in enumerate(lines, start=1):
        fields = [f.strip() for f in line.split(",")]
        if fields == [""]:
            continue
        try:
            if len(fields) != 2:
                raise ValueError
            pairs.append((int(fields[0]), int(fields[1])))
        except ValueError:
            if number == 1 and len(fields) == 2:
                continue  # header
            raise ValueError(f"{path}:{number}: expected 'id1,id2' with two integer node ids, got {line!r}") from None
    if not pairs:
        raise ValueError(f"{path}: no edges")
    return np.asarray(pairs, dtype=np.int64)


def read_features(path: Path) -> np.ndarray:
    """Dense float32 ``(N, F)`` features from a ``scipy.sparse.save_npz`` file (no pickles)."""
    try:
        matrix = sp.load_npz(path)
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a scipy sparse matrix saved with scipy.sparse.save_npz ({err})") from err
    features = np.asarray(matrix.toarray(), dtype=np.float32)
    if features.ndim != 2 or not np.isfinite(features).all():
        raise ValueError(f"{path}: expected a finite 2-D feature matrix, got shape {features.shape}")
    return features


def read_labels(path: Path) -> np.ndarray:
    """One integer label per node (``.npy``, pickles refused); integral floats are accepted."""
    try:
        labels = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: not a numpy .npy array ({err})") from err
    labels = np.squeeze(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iuf" or (labels.dtype.kind == "f" and
                                                           not np.all(np.mod(labels, 1) == 0)):
        raise ValueError(f"{path}: expected one integer label per node, got dtype {labels.dtype} shape {labels.shape}")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise ValueError(f"{path}: labels must be non-negative, found {labels.min()}")
    return labels


@dataclass
class HGCNGraph:
    """Float32 features ``(N, F)``, int64 labels ``(N,)`` and the symmetric adjacency (CSR, no self loops)."""

    name: str
    features: np.ndarray
    labels: np.ndarray
    adjacency: sp.csr_matrix

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    @classmethod
    def load(cls, path: str | Path) -> HGCNGraph:
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such dataset folder (HGCN layout: <name>/<name>.edges.csv, ...)")
        name = folder.resolve().name
        files = {key: folder / f"{name}.{key}" for key in ("edges.csv", "feats.npz", "labels.npy")}
        missing = [p.name for p in files.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: missing {', '.join(missing)} (the file names follow the folder name)")
        edges = read_edges(files["edges.csv"])
        features = read_features(files["feats.npz"])
        labels = read_labels(files["labels.npy"])
        n = features.shape[0]
        if len(labels) != n:
            raise ValueError(f"{files['labels.npy']}: {len(labels)} labels but {files['feats.npz']} has {n} rows")
        if edges.min() < 0 or edges.max() >= n:
            raise ValueError(f"{files['edges.csv']}: node ids must lie in [0, {n}) (one per feature row), "
                             f"found {edges.min()}..{edges.max()}")
        adj = sp.coo_matrix((np.ones(len(edges), dtype=np.float32), (edges[:, 0], edges[:, 1])), shape=(n, n))
        adj = ((adj + adj.T) > 0).astype(np.float32).tocsr()
        adj.setdiag(0)
        adj.eliminate_zeros()
        return cls(name, features, labels, adj)


def node_split(labels: np.ndarray, val_fraction: float, test_fraction: float,
               seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HGCN's class-balanced node split: ``round(fraction * min(#pos, #neg))`` nodes of each of the two
    groups (``label != 0`` / ``label == 0``) go to validation and to test, the rest train."""
    rng = np.random.default_rng(seed)
    groups = [rng.permutation(np.flatnonzero(labels != 0)), rng.permutation(np.flatnonzero(labels == 0))]
    m = min(len(g) for g in groups)
    n_val, n_test = round(val_fraction * m), round(test_fraction * m)
    val = np.concatenate([g[:n_val] for g in groups])
    test = np.concatenate([g[n_val:n_val + n_test] for g in groups])
    train = np.concatenate([g[n_val + n_test:] for g in groups])
    return np.sort(train), np.sort(val), np.sort(test)


def degree_one_hot(adj: sp.csr_matrix) -> np.ndarray:
    """HGCN's Airport augmentation: one-hot degree (clipped at 5) and a constant column."""
    degree = np.minimum(np.asarray(adj.sum(1)).ravel().astype(np.int64), 5)
    return np.hstack([np.eye(6, dtype=np.float32)[degree], np.ones((adj.shape[0], 1), dtype=np.float32)])


class HGCNDataModule(WholeGraphLoaders, L.LightningDataModule):
    """Full-batch link prediction or node classification on an HGCN-layout folder; yields the same batch
    dictionary as :class:`~lightning_grendel.hyperbolic.data.planetoid.PlanetoidDataModule`.

    Args:
        path: the dataset folder; its name is the file prefix (``.../disease_lp`` reads
            ``disease_lp/disease_lp.edges.csv``).
        task: ``"lp"`` (edge split, adjacency of the training edges only) or ``"nc"`` (node split).
        normalize_features: divide each feature row by its sum (HGCN does for Cora, not for Disease,
            whose features are signed).
        degree_features: append HGCN's one-hot degree and constant columns (its Airport set-up).
        val_fraction: validation share (edges for ``lp``, default 0.05; nodes for ``nc``, default HGCN's
            value for the dataset name).
        test_fraction: test share (edges: 0.10; nodes: HGCN's value for the dataset name).
        seed: seed of the split.
    """

    def __init__(self, path: str | None = None, task: Literal["lp", "nc"] = "lp", normalize_features: bool = False,
                 degree_features: bool = False, val_fraction: float | None = None,
                 test_fraction: float | None = None, seed: int = 1234) -> None:
        super().__init__()
        if task not in ("lp", "nc"):
            raise ValueError(f"task must be 'lp' or 'nc', got {task!r}")
        self.graph = HGCNGraph.load(require_data_path(path, "HGCNDataModule"))
        adj = self.graph.adjacency
        feats = self.graph.features
        if normalize_features:
            sums = feats.sum(1, keepdims=True)
            feats = feats / np.where(sums == 0, 1.0, sums)
        extra: dict[str, np.ndarray] = {}
        if task == "lp":
            extra = split_edges(adj, 0.05 if val_fraction is None else val_fraction,
                                0.10 if test_fraction is None else test_fraction, seed)
            if not (len(extra["val_pos"]) and len(extra["test_pos"])):
                raise ValueError(f"{path}: {len(extra['train_pos'])} edges are too few for a validation and a test "
                                 "edge at these fractions")
            train = extra["train_pos"]
            adj = sp.coo_matrix((np.ones(len(train), dtype=np.float32), (train[:, 0], train[:, 1])), shape=adj.shape)
            adj = (adj + adj.T).tocsr()
            idx = (np.arange(adj.shape[0]),) * 3
        else:
            default_val, default_test = NC_SPLITS.get(self.graph.name, NC_SPLITS["disease_nc"])
            idx = node_split(self.graph.labels, default_val if val_fraction is None else val_fraction,
                             default_test if test_fraction is None else test_fraction, seed)
            if not (len(idx[1]) and len(idx[2])):
                raise ValueError(f"{path}: too few nodes of each class for a validation and a test node")
        if degree_features:
            feats = np.hstack([feats, degree_one_hot(adj)])
        self.num_features = feats.shape[1]
        self.num_classes = self.graph.num_classes
        self.batch = {
            "features": torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)),
            "adjacency": normalized_adjacency(adj),
            "labels": torch.from_numpy(self.graph.labels),
            **{f"idx_{split}": torch.from_numpy(i) for split, i in zip(("train", "val", "test"), idx, strict=True)},
            **{key: torch.from_numpy(value) for key, value in extra.items()},
        }


"""Planetoid citation graphs (``ind.<name>.*`` files, e.g. Cora) with the standard public split.

The ``x, y, allx, ally, tx, ty, graph`` files are Python pickles. They are read with
:class:`RestrictedUnpickler`, which resolves only numpy arrays/dtypes, scipy sparse matrices and plain
containers, so a tampered file cannot execute code (``pickle.load`` would run whatever it names).
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_grendel._recipes import require_data_path

PICKLED = ("x", "y", "allx", "ally", "tx", "ty", "graph")


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("scipy.sparse.csr", "csr_matrix"): lambda: sp.csr_matrix,
    ("scipy.sparse._csr", "csr_matrix"): lambda: sp.csr_matrix,
    ("scipy.sparse.csc", "csc_matrix"): lambda: sp.csc_matrix,
    ("scipy.sparse._csc", "csc_matrix"): lambda: sp.csc_matrix,
    ("scipy.sparse.coo", "coo_matrix"): lambda: sp.coo_matrix,
    ("scipy.sparse._coo", "coo_matrix"): lambda: sp.coo_matrix,
    ("_codecs", "encode"): lambda: __import__("codecs").encode,  # bytes in protocol-2 pickles from Python 3
    ("collections", "defaultdict"): lambda: __import__("collections").defaultdict,
    ("collections", "OrderedDict"): lambda: __import__("collections").OrderedDict,
}
_BUILTINS = {"list", "dict", "set", "frozenset", "tuple", "int", "float", "bool", "str", "bytes", "complex"}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only an allow-list of globals (numpy, scipy.sparse, containers)."""

    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            return getattr(__import__("builtins"), name)
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: not on the allow-list")
        return factory()


def restricted_load(path: str | Path):
    """Load one pickle with :class:`RestrictedUnpickler` (``latin1`` for the Python-2 Planetoid files)."""
    path = Path(path)
    try:
        return RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise pickle.UnpicklingError(f"{path}: {err}") from err
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise ValueError(f"{path}: not a valid Planetoid pickle ({type(err).__name__}: {err})") from err


@dataclass
class Planetoid:
    """Features ``(N, F)`` float32, labels ``(N,)``, symmetric adjacency (scipy CSR, no self loops) and
    the public split: the first ``len(y)`` nodes train, the next 500 (fewer in tiny graphs) validate,
    the nodes listed in ``test.index`` test."""

    features: np.ndarray
    labels: np.ndarray
    adjacency: sp.csr_matrix
    idx_train: np.ndarray
    idx_val: np.ndarray
    idx_test: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    @classmethod
    def load(cls, path: str | Path, name: str = "cora") -> Planetoid:
        path = Path(path)
        files = {key: path / f"ind.{name}.{key}" for key in (*PICKLED, "test.index")}
        missing = [p.name for p in files.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: missing Planetoid files {', '.join(missing)}")
        obj = {key: restricted_load(files[key]) for key in PICKLED}
        for key in ("x", "allx", "tx"):
            if not sp.issparse(obj[key]):
                raise ValueError(f"{files[key]}: expected a scipy sparse feature matrix, got {type(obj[key]).__name__}")
        for key in ("y", "ally", "ty"):
            if not isinstance(obj[key], np.ndarray) or obj[key].ndim != 2:
                raise ValueError(f"{files[key]}: expected a 2-D one-hot label array")
        if not isinstance(obj["graph"], dict):
            raise ValueError(f"{files['graph']}: expected a dict of adjacency lists, got {type(obj['graph']).__name__}")
        for a, b in (("x", "y"), ("allx", "ally"), ("tx", "ty")):
            if obj[a].shape[0] != obj[b].shape[0]:
                raise ValueError(f"{files[a]} has {obj[a].shape[0]} rows but {files[b]} has {obj[b].shape[0]}")
        try:
            test_index = np.array([int(line) for line in files["test.index"].read_text().split()], dtype=np.int64)
        except ValueError as err:
            raise ValueError(f"{files['test.index']}: expected one integer per line ({err})") from err
        if len(test_index) != obj["tx"].shape[0]:
            raise ValueError(f"{files['test.index']}: {len(test_index)} indices for {obj['tx'].shape[0]} test rows")

        test_range = np.sort(test_index)
        features = sp.vstack([obj["allx"], obj["tx"]]).tolil()
        labels = np.vstack([obj["ally"], obj["ty"]])
        n = features.shape[0]
        if test_range.max() >= n or test_range.min() < obj["allx"].shape[0]:
            raise ValueError(f"{files['test.index']}: indices outside [{obj['allx'].shape[0]}, {n})")
        features[test_index, :] = features[test_range, :]
        labels[test_index, :] = labels[test_range, :]
        graph = obj["graph"]
        if len(graph) != n:
            raise ValueError(f"{files['graph']}: {len(graph)} nodes but the features have {n} rows")
        rows = np.array([u for u, vs in graph.items() for _ in vs], dtype=np.int64)
        cols = np.array([v for vs in graph.values() for v in vs], dtype=np.int64)
        adj = sp.coo_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n, n)).tocsr()
        adj = ((adj + adj.T) > 0).astype(np.float32)
        adj.setdiag(0)
        adj.eliminate_zeros()
        n_train = obj["y"].shape[0]
        return cls(np.asarray(features.todense(), dtype=np.float32), labels.argmax(1).astype(np.int64), adj.tocsr(),
                   np.arange(n_train), np.arange(n_train, min(n_train + 500, obj["allx"].shape[0])), test_range)


def normalized_adjacency(adj: sp.csr_matrix) -> Tensor:
    """Row-normalised ``A + I`` as a sparse torch tensor: the centroid weights of a graph convolution."""
    a = adj + sp.eye(adj.shape[0], dtype=np.float32, format="csr")
    a = sp.diags(1.0 / np.asarray(a.sum(1)).ravel()) @ a
    a = a.tocoo()
    idx = torch.from_numpy(np.vstack([a.row, a.col]).astype(np.int64))
    return torch.sparse_coo_tensor(idx, torch.from_numpy(a.data.astype(np.float32)), a.shape).coalesce()


def split_edges(adj: sp.csr_matrix, val_fraction: float, test_fraction: float,
                seed: int) -> dict[str, np.ndarray]:
    """HGCN-style link-prediction split of the undirected edges: ``val``/``test`` positives plus as many
    negatives (non-edges), ``train`` positives (the training graph); arrays of ``(E, 2)`` node pairs."""
    rng = np.random.default_rng(seed)
    upper = sp.triu(adj, k=1).tocoo()
    edges = np.stack([upper.row, upper.col], axis=1)[rng.permutation(upper.nnz)]
    n_val, n_test = int(len(edges) * val_fraction), int(len(edges) * test_fraction)
    n = adj.shape[0]
    negatives = []
    seen = {tuple(e) for e in edges}
    while len(negatives) < n_val + n_test:
        i, j = sorted(rng.integers(0, n, 2).tolist())
        if i != j and (i, j) not in seen:
            seen.add((i, j))
            negatives.append((i, j))
    negatives = np.array(negatives, dtype=np.int64)
    return {"val_pos": edges[:n_val], "test_pos": edges[n_val:n_val + n_test], "train_pos": edges[n_val + n_test:],
            "val_neg": negatives[:n_val], "test_neg": negatives[n_val:]}


class WholeGraphLoaders:
    """Data-module loaders for full-batch graph training: every split is one batch, the whole graph."""

    batch: dict[str, Tensor]

    def _loader(self) -> DataLoader:
        return DataLoader([self.batch], batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()


class PlanetoidDataModule(WholeGraphLoaders, L.LightningDataModule):
    """Full-batch node classification: every loader yields the whole graph once (features row-normalised,
    normalised adjacency, labels and the three index sets); the module picks the split by stage.

    ``link_prediction=True`` also holds out 5% / 10% of the edges (``val_pos``/``test_pos`` with as many
    non-edges ``val_neg``/``test_neg``); the adjacency then contains only the ``train_pos`` edges.

    Args:
        path: folder with the ``ind.<name>.*`` Planetoid files.
        name: dataset prefix of those files (``cora``, ``citeseer``, ``pubmed``, ...).
        normalize_features: divide each node's features by their sum (rows sum to 1).
        link_prediction: hold out 5% / 10% of the edges for validation / test link prediction (see above).
        seed: seed of the held-out edges and sampled non-edges (used only with ``link_prediction``).
    """

    def __init__(self, path: str | None = None, name: str = "cora", normalize_features: bool = True,
                 link_prediction: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.path = path = require_data_path(path, "PlanetoidDataModule")
        self.name = name
        self.graph = Planetoid.load(path, name)
        feats = self.graph.features
        if normalize_features:
            feats = feats / np.clip(feats.sum(1, keepdims=True), 1e-12, None)
        adj = self.graph.adjacency
        edges = {}
        if link_prediction:
            edges = split_edges(adj, 0.05, 0.1, seed)
            train = edges["train_pos"]
            adj = sp.coo_matrix((np.ones(len(train), dtype=np.float32), (train[:, 0], train[:, 1])), shape=adj.shape)
            adj = (adj + adj.T).tocsr()
        self.batch = {
            "features": torch.from_numpy(np.ascontiguousarray(feats)),
            "adjacency": normalized_adjacency(adj),
            **{key: torch.from_numpy(value) for key, value in edges.items()},
            "labels": torch.from_numpy(self.graph.labels),
            "idx_train": torch.from_numpy(self.graph.idx_train),
            "idx_val": torch.from_numpy(self.graph.idx_val),
            "idx_test": torch.from_numpy(self.graph.idx_test),
        }

    @property
    def num_features(self) -> int:
        return self.graph.features.shape[1]

    @property
    def num_classes(self) -> int:
        return self.graph.num_classes


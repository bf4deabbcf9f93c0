"""Knowledge-graph triples (WN18RR / FB15k-237 format) and a LightningDataModule for link prediction.

Files are ``train.txt``, ``valid.txt``, ``test.txt`` with one ``head<TAB>relation<TAB>tail`` per line.
Every relation ``r`` gets a reverse ``r + R`` with ``(t, r + R, h)``, so head prediction becomes tail
prediction; ranking is the standard filtered setting in both directions (all true tails from
train/valid/test except the target are removed before ranking).

Entities that appear in valid/test but never in train ("unseen") are handled the standard way used
by ConvE, MuRP and HyboNet on WN18RR: the vocabulary is built over all three splits, so such an entity
keeps its (untrained) embedding and is ranked like any other. ``drop_unseen=True`` instead removes
evaluation triples whose entity or relation is absent from train (the count is exposed as
``num_dropped``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler

from lightning_grendel._recipes import require_data_path
from lightning_grendel.hyperbolic.data.keyset import KeySet

SPLITS = ("train", "valid", "test")


def read_triples(path: str | Path) -> list[tuple[str, str, str]]:
    """Read ``head<TAB>relation<TAB>tail`` lines; blank lines are skipped, anything else is an error."""
    path = Path(path)
    triples = []
    with path.open(encoding="utf-8-sig") as f:  # a UTF-8 BOM (Windows editors) is not part of the first entity
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) != 3 or not all(field.strip() for field in fields):
                raise ValueError(
                    f"{path}:{lineno}: expected 3 tab-separated fields (head, relation, tail), got {line!r}"
                )
            triples.append((fields[0].strip(), fields[1].strip(), fields[2].strip()))
    if not triples:
        raise ValueError(f"{path}: no triples")
    return triples


@dataclass
class KnowledgeGraph:
    """Index triples with reverse relations; ``train/valid/test`` are int64 arrays ``(N, 3)``."""

    entities: list[str]
    relations: list[str]
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    num_dropped: int = 0

    @property
    def num_entities(self) -> int:
        return len(self.entities)

    @property
    def num_relations(self) -> int:
        """Relations including reverses (``2 R``)."""
        return 2 * len(self.relations)

    @classmethod
    def load(cls, path: str | Path, drop_unseen: bool = False) -> KnowledgeGraph:
        path = Path(path)
        missing = [s for s in SPLITS if not (path / f"{s}.txt").is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: missing {', '.join(f'{s}.txt' for s in missing)}")
        raw = {s: read_triples(path / f"{s}.txt") for s in SPLITS}
        num_dropped = 0
        if drop_unseen:
            ents = {e for h, _, t in raw["train"] for e in (h, t)}
            rels = {r for _, r, _ in raw["train"]}
            for s in ("valid", "test"):
                kept = [x for x in raw[s] if x[0] in ents and x[2] in ents and x[1] in rels]
                num_dropped += len(raw[s]) - len(kept)
                raw[s] = kept
        entities = sorted({e for s in SPLITS for h, _, t in raw[s] for e in (h, t)})
        relations = sorted({r for s in SPLITS for _, r, _ in raw[s]})
        e_idx = {e: i for i, e in enumerate(entities)}
        r_idx = {r: i for i, r in enumerate(relations)}
        n_rel = len(relations)

        def index(triples: list[tuple[str, str, str]]) -> np.ndarray:
            fwd = np.array([(e_idx[h], r_idx[r], e_idx[t]) for h, r, t in triples], dtype=np.int64)
            fwd = fwd.reshape(-1, 3)
            rev = np.stack([fwd[:, 2], fwd[:, 1] + n_rel, fwd[:, 0]], axis=1)
            return np.concatenate([fwd, rev])

        return cls(entities, relations, index(raw["train"]), index(raw["valid"]), index(raw["test"]),
                   num_dropped)

    def keys(self, triples: np.ndarray) -> np.ndarray:
        """Unique int64 key per triple, for vectorised membership tests."""
        return (triples[:, 0] * self.num_relations + triples[:, 1]) * self.num_entities + triples[:, 2]


class TrueTails:
    """All known ``(h, r) -> t`` facts: hashed for vectorised membership, sorted for per-query filters."""

    def __init__(self, graph: KnowledgeGraph) -> None:
        self.graph = graph
        triples = np.concatenate([graph.train, graph.valid, graph.test])
        self.sorted_keys = np.unique(graph.keys(triples))
        self.key_set = KeySet(self.sorted_keys)
        n_ent = graph.num_entities
        self.query_keys = self.sorted_keys // n_ent  # (h, r) key, sorted because keys are
        self.tails = self.sorted_keys % n_ent

    def contains(self, head: np.ndarray, relation: np.ndarray, tail: np.ndarray) -> np.ndarray:
        """Whether each ``(head, relation, tail)`` (broadcast together) is a known fact."""
        return self.key_set.contains((head * self.graph.num_relations + relation) * self.graph.num_entities + tail)

    def filter_coo(self, head: np.ndarray, relation: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, ...]:
        """``(rows, cols)`` of every known tail of each query except its own target."""
        q = head * self.graph.num_relations + relation
        lo = np.searchsorted(self.query_keys, q, side="left")
        hi = np.searchsorted(self.query_keys, q, side="right")
        counts = hi - lo
        rows = np.repeat(np.arange(len(q)), counts)
        starts = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        cols = self.tails[starts + np.arange(counts.sum())]
        keep = cols != target[rows]
        return rows[keep], cols[keep]


class _TrainBatches(Dataset):
    """Indexed by a list of triple ids; returns the batch with ``num_negatives`` filtered negatives."""

    def __init__(self, triples: np.ndarray, true_tails: TrueTails, num_negatives: int, seed: int) -> None:
        self.triples = triples
        self.true_tails = true_tails
        self.num_negatives = num_negatives
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.triples)

    def __getitem__(self, ids: list[int] | np.ndarray) -> dict[str, Tensor]:
        batch = self.triples[np.asarray(ids)]
        n_ent = self.true_tails.graph.num_entities
        negatives = self.rng.integers(0, n_ent, size=(len(batch), self.num_negatives))
        heads, rels = batch[:, :1], batch[:, 1:2]
        bad = np.nonzero(self.true_tails.contains(heads, rels, negatives))
        for _ in range(100):  # re-draw the negatives that are true facts ("real negatives") until none is
            if not len(bad[0]):
                break
            negatives[bad] = redrawn = self.rng.integers(0, n_ent, size=len(bad[0]))
            still = self.true_tails.contains(heads[bad[0], 0], rels[bad[0], 0], redrawn)
            bad = (bad[0][still], bad[1][still])
        tails = np.concatenate([batch[:, 2:], negatives], axis=1)
        return {"head": torch.from_numpy(batch[:, 0]), "relation": torch.from_numpy(batch[:, 1]),
                "tails": torch.from_numpy(tails)}


class _ShuffledBatches(Sampler):
    """A fresh permutation each epoch, cut into index arrays of ``batch_size`` (the last, short one
    dropped when there is more than one batch), like ``BatchSampler(RandomSampler(...), drop_last)``
    without building a Python list of ints per batch."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.drop_last = n > batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator).numpy()
        for i in range(len(self)):
            yield order[i * self.batch_size:(i + 1) * self.batch_size]


class _EvalBatches(Dataset):
    """Indexed by a list of query ids; returns queries plus the COO filter of other true tails."""

    def __init__(self, triples: np.ndarray, true_tails: TrueTails) -> None:
        self.triples = triples
        self.true_tails = true_tails

    def __len__(self) -> int:
        return len(self.triples)

    def __getitem__(self, ids: list[int]) -> dict[str, Tensor]:
        batch = self.triples[np.asarray(ids)]
        rows, cols = self.true_tails.filter_coo(batch[:, 0], batch[:, 1], batch[:, 2])
        return {"head": torch.from_numpy(batch[:, 0]), "relation": torch.from_numpy(batch[:, 1]),
                "tail": torch.from_numpy(batch[:, 2]), "filter_rows": torch.from_numpy(rows),
                "filter_cols": torch.from_numpy(cols)}


class KnowledgeGraphDataModule(L.LightningDataModule):
    """WN18RR-format folder -> training batches with negatives, filtered ranking queries.

    ``train_fraction`` < 1 keeps a random subset of training triples (for smoke tests on real data).

    Args:
        path: folder with ``train.txt``, ``valid.txt`` and ``test.txt`` (``head<TAB>relation<TAB>tail`` lines).
        batch_size: training triples per batch (reverse triples count as triples of their own).
        num_negatives: random tails per training triple, re-drawn while they form a true triple.
        eval_batch_size: queries per validation/test batch (each is ranked against every entity).
        drop_unseen: remove valid/test triples whose entity or relation never appears in train,
            instead of ranking them with untrained embeddings.
        train_fraction: fraction of the training triples kept (a random subset, drawn with ``seed``).
        seed: seed of the training subset and of the negative sampling.
    """

    def __init__(self, path: str | None = None, batch_size: int = 1000, num_negatives: int = 50,
                 eval_batch_size: int = 256,
                 drop_unseen: bool = False, train_fraction: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        self.path = path = require_data_path(path, "KnowledgeGraphDataModule")
        self.batch_size = batch_size
        self.num_negatives = num_negatives
        self.eval_batch_size = eval_batch_size
        self.drop_unseen = drop_unseen
        self.train_fraction = train_fraction
        self.seed = seed
        self.graph = KnowledgeGraph.load(path, drop_unseen=drop_unseen)
        self.true_tails = TrueTails(self.graph)

    @property
    def num_entities(self) -> int:
        return self.graph.num_entities

    @property
    def num_relations(self) -> int:
        return self.graph.num_relations

    def _train_triples(self) -> np.ndarray:
        triples = self.graph.train
        if self.train_fraction < 1.0:
            rng = np.random.default_rng(self.seed)
            keep = rng.permutation(len(triples))[: max(1, int(len(triples) * self.train_fraction))]
            triples = triples[np.sort(keep)]
        return triples

    def train_dataloader(self) -> DataLoader:
        data = _TrainBatches(self._train_triples(), self.true_tails, self.num_negatives, self.seed)
        return DataLoader(data, sampler=_ShuffledBatches(len(data), self.batch_size, self.seed), batch_size=None)

    def _eval_loader(self, triples: np.ndarray) -> DataLoader:
        data = _EvalBatches(triples, self.true_tails)
        return DataLoader(data, sampler=BatchSampler(SequentialSampler(data), self.eval_batch_size, False),
                          batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.graph.valid)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.graph.test)

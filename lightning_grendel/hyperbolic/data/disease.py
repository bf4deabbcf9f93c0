"""Disease-like graphs generated offline, written in HGCN's layout (tests and benchmarks need no download).

HGCN's Disease sets are a tree over which an SIR epidemic spread: a node's label says whether it was
infected, its features describe its susceptibility. Its public ``disease_lp`` files (2,665 nodes, a
tree of depth 4 with about seven children per inner node) hold ten susceptibility columns that say
nothing about the edges and one column that places every node inside its parent's interval of
``[-1, 1]`` (children at the centres of equal sub-intervals), the only trace of the hierarchy in the
features. The generator builds the same kind of graph: a tree of a given depth with Poisson numbers
of children, Gaussian susceptibility columns, that interval column, and an outbreak from the root in
which an infected node infects each child with probability ``sigmoid(bias + gain * mean(s_child))``
(on a tree, SIR with eventual recovery reduces to this percolation).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp


@dataclass
class DiseaseLike:
    """Tree edges ``(N-1, 2)`` (parent, child), features ``(N, F)`` and 0/1 infection labels ``(N,)``."""

    edges: np.ndarray
    features: np.ndarray
    labels: np.ndarray


def generate_disease_like(depth: int = 4, branching: float = 7.0, num_susceptibility: int = 10,
                          bias: float = 1.5, gain: float = 1.0, seed: int = 0) -> DiseaseLike:
    """A random tree (``depth`` levels below the root, ``max(1, Poisson(branching))`` children per inner
    node) with susceptibility features, the interval-position column last, and an SIR outbreak."""
    if depth < 1 or branching <= 0 or num_susceptibility < 0:
        raise ValueError(f"need depth >= 1, branching > 0, num_susceptibility >= 0; got {depth}, {branching}, "
                         f"{num_susceptibility}")
    rng = np.random.default_rng(seed)
    parents, position, half_width = [-1], [0.0], [1.0]
    level = [0]
    for _ in range(depth):
        next_level = []
        for node in level:
            m = max(1, int(rng.poisson(branching)))
            width = 2.0 * half_width[node] / m
            for c in range(m):
                next_level.append(len(parents))
                parents.append(node)
                position.append(position[node] - half_width[node] + (c + 0.5) * width)
                half_width.append(width / 2.0)
        level = next_level
    n = len(parents)
    susceptibility = rng.normal(0.4, 0.8, size=(n, num_susceptibility))
    infected = np.zeros(n, dtype=np.int64)
    infected[0] = 1
    mean_s = susceptibility.mean(1) if num_susceptibility else np.zeros(n)
    for node in range(1, n):  # parents precede children
        p = 1.0 / (1.0 + np.exp(-(bias + gain * mean_s[node])))
        infected[node] = infected[parents[node]] and rng.random() < p
    features = np.hstack([susceptibility, np.asarray(position)[:, None]]).astype(np.float32)
    edges = np.stack([np.asarray(parents[1:], dtype=np.int64), np.arange(1, n)], axis=1)
    return DiseaseLike(edges, features, infected)


def _replace_atomically(target: Path, write, suffix: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_hgcn_folder(folder: str | Path, data: DiseaseLike, header: bool = False) -> Path:
    """Write ``<folder>/<name>.{edges.csv,feats.npz,labels.npy}`` (name = folder name), each atomically.

    HGCN's own CSVs have no header line; ``header=True`` writes ``id1,id2`` first (the loader takes both).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = folder.resolve().name
    lines = (["id1,id2"] if header else []) + [f"{i},{j}" for i, j in data.edges.tolist()]
    _replace_atomically(folder / f"{name}.edges.csv", lambda p: Path(p).write_text("\n".join(lines) + "\n"), ".csv")
    _replace_atomically(folder / f"{name}.feats.npz", lambda p: sp.save_npz(p, sp.csr_matrix(data.features)), ".npz")
    _replace_atomically(folder / f"{name}.labels.npy", lambda p: np.save(p, data.labels), ".npy")
    return folder

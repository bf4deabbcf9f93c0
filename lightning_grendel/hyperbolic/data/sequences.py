"""Generated sequence tasks for the Lorentz transformer (no download): bracket depth and reversal.

* ``depth`` (classification): a balanced bracket string; the label is its maximum nesting depth minus
  one, capped at ``num_classes - 1``. Nesting is tree structure, the kind of data hyperbolic space fits.
* ``reverse`` (sequence-to-sequence): a random token string; the target is the string reversed.

Token ids: 0 = padding, 1 = begin-of-sequence, 2.. = symbols. Data are generated from ``seed``, so
train/val/test are fixed and disjoint draws from the same distribution.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

PAD, BOS, FIRST_SYMBOL = 0, 1, 2


def bracket_depth_data(n: int, max_len: int, num_classes: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """``n`` balanced bracket strings (``(`` = 2, ``)`` = 3) of even length <= ``max_len``, with labels."""
    tokens = np.full((n, max_len), PAD, dtype=np.int64)
    labels = np.zeros(n, dtype=np.int64)
    for i in range(n):
        # draw the depth first so that classes are balanced (depths above max_len // 2 cannot fit)
        target = rng.integers(1, min(num_classes, max_len // 2) + 1)
        half = rng.integers(target, max_len // 2 + 1)
        seq, depth, opened, best = [], 0, 0, 0
        while len(seq) < 2 * half:
            can_open = opened < half and depth < target
            if can_open and (depth == 0 or rng.random() < 0.5):
                seq.append(2)
                depth, opened = depth + 1, opened + 1
            else:
                seq.append(3)
                depth -= 1
            best = max(best, depth)
        tokens[i, : len(seq)] = seq
        labels[i] = min(best, num_classes) - 1
    return torch.from_numpy(tokens), torch.from_numpy(labels)


def reverse_data(n: int, max_len: int, num_symbols: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """``n`` random strings of length ``max_len // 2 .. max_len`` and their reversals (padded)."""
    src = np.full((n, max_len), PAD, dtype=np.int64)
    tgt = np.full((n, max_len), PAD, dtype=np.int64)
    for i in range(n):
        length = rng.integers(max_len // 2, max_len + 1)
        s = rng.integers(FIRST_SYMBOL, FIRST_SYMBOL + num_symbols, length)
        src[i, :length] = s
        tgt[i, :length] = s[::-1]
    return torch.from_numpy(src), torch.from_numpy(tgt)


class SequenceTaskDataModule(L.LightningDataModule):
    """Serves ``(tokens, labels)`` (``depth``) or ``(src, tgt)`` (``reverse``) batches.

    Args:
        task: ``depth`` (classify a bracket string's maximum nesting) or ``reverse`` (sequence to its reversal).
        num_train: generated training sequences.
        num_val: generated validation sequences.
        num_test: generated test sequences.
        max_len: sequence length in tokens, padding included (``reverse`` strings are ``max_len // 2`` or longer).
        num_symbols: distinct symbols of the ``reverse`` strings (the vocabulary adds padding and BOS).
        num_classes: ``depth`` classes: depths 1 .. ``num_classes``, deeper strings are capped at the last.
        batch_size: sequences per batch.
        seed: seed of the generated data (fixed, disjoint train/val/test draws).
    """

    def __init__(self, task: Literal["depth", "reverse"] = "reverse", num_train: int = 4000, num_val: int = 500,
                 num_test: int = 500, max_len: int = 10, num_symbols: int = 8, num_classes: int = 4,
                 batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        if task not in ("depth", "reverse"):
            raise ValueError(f"task must be 'depth' or 'reverse', got {task!r}")
        self.task = task
        self.batch_size = batch_size
        self.max_len = max_len
        self.num_classes = num_classes
        self.vocab_size = FIRST_SYMBOL + (2 if task == "depth" else num_symbols)
        rng = np.random.default_rng(seed)
        make = (lambda n: bracket_depth_data(n, max_len, num_classes, rng)) if task == "depth" else (
            lambda n: reverse_data(n, max_len, num_symbols, rng))
        self.splits = {name: TensorDataset(*make(n)) for name, n in
                       (("train", num_train), ("val", num_val), ("test", num_test))}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=self.batch_size)

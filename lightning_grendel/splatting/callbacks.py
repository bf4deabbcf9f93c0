"""RunSummary: one JSON file per run with what experiments compare (Gaussians, time, memory, traffic, metrics).

Fit and test usually run as separate commands; each merges its keys into the same file, written
atomically on rank 0. Peak memory is every rank's peak resident set size, gathered.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_grendel._atomic import atomic_write
from lightning_grendel.splatting.module import GaussianSplattingModule


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class RunSummary(Callback):
    """Write ``path`` (JSON) with fit wall time, Gaussian count, per-rank peak memory, bytes sent per step,
    and the test metrics, for a :class:`~lightning_grendel.splatting.module.GaussianSplattingModule`.

    Args:
        path: the JSON file; fit and test merge their keys into it (written atomically on rank 0).
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._started = 0.0
        self._bytes: list[float] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not isinstance(pl_module, GaussianSplattingModule):
            raise TypeError(f"RunSummary summarises a GaussianSplattingModule run, got {type(pl_module).__name__}")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        stats = pl_module.renderer.last_stats
        if "bytes_sent" in stats:
            self._bytes.append(stats["bytes_sent"])

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        local_bytes = sum(self._bytes) / len(self._bytes) if self._bytes else 0.0
        gathered = trainer.strategy.all_gather(torch.tensor([float(_peak_rss_bytes()), local_bytes]))
        gathered = gathered.reshape(-1, 2)
        self._merge(trainer, {
            "world_size": trainer.world_size,
            "fit_seconds": time.perf_counter() - self._started,
            "images_seen": int(pl_module.images_seen),
            "gaussians": pl_module.global_gaussian_count(),
            "peak_rss_bytes_per_rank": [int(v) for v in gathered[:, 0].tolist()],
            "bytes_sent_per_step": float(gathered[:, 1].sum()),
        })

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("test/")}
        self._merge(trainer, {"test": metrics, "test_gaussians": pl_module.global_gaussian_count()})

    def _merge(self, trainer: Trainer, values: dict[str, Any]) -> None:
        if not trainer.is_global_zero:
            return
        current = json.loads(self.path.read_text()) if self.path.is_file() else {}
        current.update(values)
        with atomic_write(self.path, "w") as file:
            json.dump(current, file, indent=2)

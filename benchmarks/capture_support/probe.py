"""StepProbe: a callback the capture benchmarks add to their runs (``--trainer.callbacks``), gathering per rank
the step times, the peak RSS, the whole process's PSS, and the memory of the image cache's mapped files.

PSS (proportional set size, ``/proc/<pid>/smaps``) counts a page shared by k processes as 1/k in each, so
summed over the ranks of a host it counts shared pages once: the honest measure of what they hold together.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def mapped_kib(prefix: str) -> tuple[int, int, list[str]]:
    """(RSS, PSS) in KiB of this process's mappings of files under ``prefix``, from ``/proc/self/smaps``, and
    the files mapped."""
    rss = pss = 0
    inside = False
    files = set()
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line: range perms offset dev inode path
                fields = line.split(maxsplit=5)
                inside = len(fields) == 6 and fields[5].strip().startswith(prefix)
                if inside:
                    files.add(fields[5].strip())
            elif inside and first == "Rss:":
                rss += int(line.split()[1])
            elif inside and first == "Pss:":
                pss += int(line.split()[1])
    return rss, pss, sorted(files)


def peak_rss_kib() -> int:
    """This process's peak RSS (``VmHWM``), in KiB. Not ``getrusage``'s ``ru_maxrss``: Linux carries that over
    ``execve``, so a child started by a large parent reports the parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmHWM line")


def rollup_kib() -> dict[str, int]:
    """This process's ``/proc/self/smaps_rollup`` totals (Rss, Pss, ...) in KiB."""
    values = {}
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                values[parts[0].rstrip(":")] = int(parts[1])
    return values


class StepProbe(Callback):
    """Writes ``path`` (JSON, rank 0) at the end of fit: per rank, the end time of every step, the peak RSS,
    the final Rss/Pss, and (with ``image_cache_dir``) the Rss/Pss of the mapped image-cache files after
    every step, and the size of one copy of them (the distinct files any rank maps).

    Args:
        path: the JSON file.
        image_cache_dir: the streamed images' disk cache (None: do not read smaps every step).
    """

    def __init__(self, path: str, image_cache_dir: str | None = None) -> None:
        self.path = Path(path)
        self.prefix = None if image_cache_dir is None else str(Path(image_cache_dir).resolve())
        self.ends: list[float] = []
        self.images: list[tuple[int, int]] = []
        self.files: list[list[str]] = []  # per step, the image-cache files mapped

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.ends.append(time.perf_counter())
        if self.prefix is not None:
            rss, pss, files = mapped_kib(self.prefix)
            self.images.append((rss, pss))
            self.files.append(files)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rollup = rollup_kib()
        peak = peak_rss_kib()
        count = pl_module.gaussians["means"].shape[0]
        mine = torch.tensor([float(peak), rollup.get("Rss", 0), rollup.get("Pss", 0), count], dtype=torch.float64)
        images = torch.tensor(self.images or [(0, 0)], dtype=torch.float64)
        ends = torch.tensor(self.ends, dtype=torch.float64)
        gathered = trainer.strategy.all_gather(mine).reshape(-1, 4)
        gathered_images = trainer.strategy.all_gather(images).reshape(trainer.world_size, -1, 2)
        gathered_ends = trainer.strategy.all_gather(ends).reshape(trainer.world_size, -1)
        files = [self.files]
        if trainer.world_size > 1:
            files = [None] * trainer.world_size
            torch.distributed.all_gather_object(files, self.files)
        if not trainer.is_global_zero:
            return
        # One copy: the bytes of the distinct cache files any rank maps at a step (the images, held once).
        one_copy = [sum(Path(name).stat().st_size for name in set().union(*(rank[step] for rank in files)))
                    for step in range(len(self.files))]
        result = {
            "world_size": trainer.world_size,
            "gaussians": int(gathered[:, 3].sum()),
            "peak_rss_kib": gathered[:, 0].tolist(),
            "final_rss_kib": gathered[:, 1].tolist(),
            "final_pss_kib": gathered[:, 2].tolist(),
            "image_rss_kib": gathered_images[..., 0].tolist(),  # [rank][step]
            "image_pss_kib": gathered_images[..., 1].tolist(),
            "step_ends": gathered_ends.tolist(),  # [rank][step], perf_counter seconds
            "image_one_copy_bytes": one_copy,  # [step]
        }
        self.path.write_text(json.dumps(result))

"""What the live view costs training: step time with and without ``LiveViewer`` refreshes at its default interval.

Trains the ``gaussian/colmap`` recipe's model on ``colmap_blocks`` (240 px, densifying as in a real run)
from the recipe's seed. After ``--warmup`` untimed steps (the Gaussian count grows to a realistic size),
the run alternates blocks of ``--every`` steps (the refresh interval, default the LiveViewer default)
without and with a refresh: an "on" block starts with a refresh (gather, then conversion and sending
on rank 0's worker thread, which shares the cores with training), an "off" block has none. The run
starts and ends with an off block, and each on block is compared with the mean of the off blocks on
either side of it, so a drift (the scene growing as it densifies at every block start, a shared
machine's load changing) cancels to first order; the overhead is the mean over the on blocks of
(on / off - 1) of their mean step times. The same is
done with this process's CPU time (every thread: training, the viewer's worker, viser's sending), which
a busy shared machine disturbs far less than wall time.

Three runs: ``no_page`` (refreshes forced, ``only_when_watched=False``, no browser: the training process's
own cost), ``page`` (the page open in headless Chromium on the same machine, connected for the whole
run, so its idle drawing weighs on both blocks and the pair measures what a refresh adds there) and
``page_all`` (the same with ``max_splats=None``: every Gaussian sent, as before the cap). The off blocks
of a page run against those of ``no_page`` give what merely having the page open costs.
Prints ``RESULT <run>.overhead_pct``, ``.overhead_pct_median``, ``.off_step_ms``, ``.on_step_ms``, the
same four prefixed ``cpu_`` (CPU time per step), ``.cpu_<group>_{off,on}_ms`` (CPU ms per step of the
training thread, torch's other threads, the viewer's worker, viser's threads and the browser's
processes; Linux /proc), ``.refresh_ms`` (worker wall time per refresh), ``.refreshes``, ``.gaussians``
(at the end) and ``.shown`` (what the page got last). ``--repeats`` runs the list that many times, in turn.

    OMP_NUM_THREADS=2 python benchmarks/viewer_overhead.py [--pairs 6] [--warmup 600] [--every 100] [--repeats 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP, which reads it once

import lightning as L  # noqa: E402
import yaml  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule  # noqa: E402
from lightning_grendel.splatting.densify import DensifyConfig  # noqa: E402
from lightning_grendel.splatting.module import GaussianSplattingModule  # noqa: E402
from lightning_grendel.splatting.viewer.live import ENV_SWITCH, LiveViewer  # noqa: E402

os.environ[ENV_SWITCH] = "on"
REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--use-angle=swiftshader",
                  "--enable-unsafe-swiftshader", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1280,720"]


TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(stat_path: str) -> float:
    """utime + stime of one /proc stat file (a process or a thread), in seconds; 0 once it has gone."""
    try:
        fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def thread_cpu() -> dict[str, float]:
    """This process's CPU seconds by thread group: the training thread, the viewer's worker, viser's threads
    (its server's event loop, which serialises and sends), and the threads Python did not start (torch's)."""
    names = {thread.native_id: thread for thread in threading.enumerate()}
    groups = dict.fromkeys(THREAD_GROUPS, 0.0)
    for tid in os.listdir("/proc/self/task"):
        thread = names.get(int(tid))
        group = ("training" if thread is threading.main_thread() else "worker"
                 if thread.name.startswith("live-viewer") else "viser") if thread else "torch"
        groups[group] += _cpu_seconds(f"/proc/self/task/{tid}/stat")
    return groups


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and every descendant still running (the browser's renderer and GPU processes)."""
    total, todo, seen = 0.0, [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        total += _cpu_seconds(f"/proc/{current}/stat")
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(FileNotFoundError):
                todo += [int(child) for child in task.read_text().split()]
    return total


THREAD_GROUPS = ("training", "torch", "worker", "viser")


class StepClock(Callback):
    """Wall time and this process's CPU time (every thread: training, the viewer's worker, viser's) per step end,
    and at block boundaries (every ``every`` steps from ``warmup``) the CPU time by thread group and the browser's."""

    def __init__(self, warmup: int, every: int) -> None:
        self.warmup, self.every, self.viewer = warmup, every, None
        self.ends: dict[int, tuple[float, float]] = {}
        self.groups: dict[int, dict[str, float]] = {}
        self.counts: dict[int, int] = {}

    def on_train_batch_end(self, trainer, *args) -> None:
        step = trainer.global_step
        self.ends[step] = (time.perf_counter(), time.process_time())
        if step >= self.warmup and (step - self.warmup) % self.every == 0:
            page = getattr(self.viewer, "page", None)
            self.groups[step] = {**thread_cpu(), "browser": tree_cpu(page.pid) if page else 0.0}
            self.counts[step] = trainer.lightning_module.gaussians["means"].shape[0]


class BlockViewer(LiveViewer):
    """Refreshes at the start of every second block of ``every_n_steps`` steps after ``warmup``; times its worker."""

    def __init__(self, warmup: int, browser: str | None, **kwargs) -> None:
        super().__init__(only_when_watched=False, min_seconds=0.0, **kwargs)  # a refresh at every on block
        self.warmup, self.browser, self.page, self.worker_seconds, self.shown = warmup, browser, None, 0.0, 0

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if self.browser and self.server is not None:
            self.profile = tempfile.mkdtemp(prefix="viewer-bench-")
            self.page = subprocess.Popen([self.browser, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
                                          self.server.url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while self.server.client_count() == 0 and time.monotonic() < deadline:
                time.sleep(0.2)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        step = trainer.global_step
        if step >= self.warmup and ((step - self.warmup) // self.every_n_steps) % 2 == 1:
            super().on_train_batch_end(trainer, pl_module, *args)

    def _show(self, *args) -> None:
        start = time.perf_counter()
        super()._show(*args)
        self.worker_seconds += time.perf_counter() - start
        self.shown = len(self.server.splats.buffer)

    def teardown(self, trainer, pl_module, stage) -> None:
        super().teardown(trainer, pl_module, stage)
        if self.page is not None:
            self.page.terminate()
            self.page.wait(timeout=30)
            shutil.rmtree(self.profile, ignore_errors=True)
            self.page = None


def run(recipe: dict, data: GaussianSplattingDataModule, args: argparse.Namespace, browser: str | None,
        max_splats: int | None) -> dict:
    model_args = dict(recipe["model"]["init_args"])
    densify = DensifyConfig(**model_args.pop("densify"))
    L.seed_everything(recipe["seed_everything"], verbose=False)
    module = GaussianSplattingModule(**model_args, densify=densify, export_ply=False)
    clock = StepClock(args.warmup, args.every)
    viewer = BlockViewer(args.warmup, browser, port=0, every_n_steps=args.every, max_splats=max_splats)
    clock.viewer = viewer
    steps = args.warmup + (2 * args.pairs + 1) * args.every
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[clock, viewer])
    trainer.fit(module, datamodule=data)

    def pairs_of(total_at: dict[int, float]) -> list[tuple[float, float]]:
        """(off, on) ms per step for each on block, from a running total (seconds) at block boundaries; the
        off value is the mean of the off blocks either side."""
        def block(index: int) -> float:
            start = args.warmup + index * args.every
            return 1000 * (total_at[start + args.every] - total_at[start]) / args.every

        return [((block(2 * i) + block(2 * i + 2)) / 2, block(2 * i + 1)) for i in range(args.pairs)]

    result = {}
    for name, clock_index in (("", 0), ("cpu_", 1)):
        pairs = pairs_of({step: ends[clock_index] for step, ends in clock.ends.items()})
        ratios = [100 * (on / off - 1) for off, on in pairs]
        result.update({f"{name}overhead_pct": statistics.fmean(ratios),
                       f"{name}overhead_pct_median": statistics.median(ratios),
                       f"{name}off_step_ms": statistics.fmean(off for off, _ in pairs),
                       f"{name}on_step_ms": statistics.fmean(on for _, on in pairs)})
    for group in (*THREAD_GROUPS, "browser"):  # CPU ms per step in off and on blocks, by thread group
        pairs = pairs_of({step: groups[group] for step, groups in clock.groups.items()})
        result[f"cpu_{group}_off_ms"] = statistics.fmean(off for off, _ in pairs)
        result[f"cpu_{group}_on_ms"] = statistics.fmean(on for _, on in pairs)
    refreshes = viewer.refreshes - 2  # less the first and the last scene, sent outside the blocks
    return {**result,
            "refresh_ms": 1000 * viewer.worker_seconds / max(viewer.refreshes, 1), "refreshes": float(refreshes),
            "gaussians_first": float(clock.counts[args.warmup]), "gaussians": float(module.gaussians["means"].shape[0]),
            "shown": float(viewer.shown)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--warmup", type=int, default=600, help="untimed steps first (must be a multiple of --every)")
    parser.add_argument("--every", type=int, default=LiveViewer().every_n_steps, help="refresh interval (steps)")
    parser.add_argument("--pairs", type=int, default=6, help="on blocks timed (each between two off blocks)")
    parser.add_argument("--runs", nargs="+", choices=("no_page", "page", "page_all"),
                        default=["no_page", "page", "page_all"])
    parser.add_argument("--repeats", type=int, default=1, help="run the list this many times, in turn")
    parser.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args()
    if args.warmup % args.every:
        parser.error("--warmup must be a multiple of --every (blocks start at refresh steps)")
    if any(name.startswith("page") for name in args.runs) and not args.browser:
        parser.error("the page run needs Chromium (apt-get install chromium, or --browser PATH)")
    recipe = yaml.safe_load((REPO / "recipes" / "gaussian" / "colmap.yaml").read_text())
    data = GaussianSplattingDataModule(**{**recipe["data"]["init_args"],
                                          "path": str(Path(args.data_root) / "colmap_blocks")})
    data.setup("fit")
    print(f"warm-up {args.warmup} steps, then {args.pairs} on blocks of {args.every} steps between off blocks")
    for repeat in range(args.repeats):
        for name in args.runs:
            browser = args.browser if name.startswith("page") else None
            max_splats = None if name == "page_all" else LiveViewer().max_splats
            suffix = f"#{repeat}" if args.repeats > 1 else ""
            for key, value in run(recipe, data, args, browser, max_splats).items():
                print(f"RESULT {name}{suffix}.{key} {value:.3f}", flush=True)


if __name__ == "__main__":
    main()

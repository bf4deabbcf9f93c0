"""What the live view costs training: step time with and without ``LiveViewer`` at its default interval.

Trains the ``gaussian/colmap`` recipe's model on ``colmap_blocks`` (240 px, densifying: the Gaussian count
grows as in a real run) for ``--steps`` steps from the recipe's seed, once per configuration, in turns
(``--repeats`` rounds), each in this process on the same data:

- ``off``: no viewer;
- ``unwatched``: ``LiveViewer()`` as the recipes enable it, no page open (it skips its refreshes);
- ``forced``: every refresh done (gather, conversion, sending) although no page is open
  (``only_when_watched=False``): the training process's own cost;
- ``page``: ``LiveViewer()`` with the page open in headless Chromium on the same machine (SwiftShader:
  the browser's sorting and drawing compete with training for the same cores).

The step time is wall time between the ends of consecutive steps, averaged over every step after the
first ``--warmup`` (so the refresh steps count). ``viewer_ms`` is the time spent in the viewer's per-step
hook over the whole run and ``viewer_pct`` its share of the run's wall time (a ratio that a busy machine
disturbs less than step times); ``start_ms`` is the time to start its server (once per run). An untimed
short run comes first (compiled extensions, caches). Prints ``RESULT round<i>.<config>.step_ms``,
``.viewer_ms``, ``.viewer_pct``, ``.start_ms``, ``.refreshes``, ``.gaussians`` and ``.overhead_pct``
(step time against ``off`` of the same round).

    OMP_NUM_THREADS=2 python benchmarks/viewer_overhead.py [--steps 600] [--repeats 2] [--every 100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import lightning as L
import yaml
from lightning.pytorch import Callback

from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.densify import DensifyConfig
from lightning_grendel.splatting.module import GaussianSplattingModule
from lightning_grendel.splatting.viewer.live import ENV_SWITCH, LiveViewer

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ[ENV_SWITCH] = "on"
REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("off", "unwatched", "forced", "page")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--use-angle=swiftshader",
                  "--enable-unsafe-swiftshader", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1280,720"]


class StepClock(Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.ends.append(time.perf_counter())


class TimedViewer(LiveViewer):
    """LiveViewer that adds up the time spent in its per-step hook and opens a page when asked."""

    def __init__(self, browser: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.browser, self.seconds, self.start_seconds, self.page = browser, 0.0, 0.0, None

    def on_train_start(self, trainer, pl_module) -> None:
        start = time.perf_counter()
        super().on_train_start(trainer, pl_module)
        self.start_seconds = time.perf_counter() - start
        if self.browser and self.server is not None:
            profile = tempfile.mkdtemp(prefix="viewer-bench-")
            self.page = subprocess.Popen([self.browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", self.server.url],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.profile = profile
            deadline = time.monotonic() + 60  # let the page connect, so every refresh is watched
            while self.server.client_count() == 0 and time.monotonic() < deadline:
                time.sleep(0.2)

    def on_train_batch_end(self, *args) -> None:
        start = time.perf_counter()
        super().on_train_batch_end(*args)
        self.seconds += time.perf_counter() - start

    def teardown(self, trainer, pl_module, stage) -> None:
        if self.page is not None:
            self.page.terminate()
            self.page.wait(timeout=30)
            shutil.rmtree(self.profile, ignore_errors=True)
            self.page = None
        super().teardown(trainer, pl_module, stage)


def run(config: str, recipe: dict, data: GaussianSplattingDataModule, args: argparse.Namespace) -> dict[str, float]:
    model_args = dict(recipe["model"]["init_args"])
    densify = DensifyConfig(**model_args.pop("densify"))
    L.seed_everything(recipe["seed_everything"], verbose=False)
    module = GaussianSplattingModule(**model_args, densify=densify, export_ply=False)
    clock = StepClock()
    callbacks: list[Callback] = [clock]
    viewer = None
    if config != "off":
        viewer = TimedViewer(browser=args.browser if config == "page" else None, port=0, every_n_steps=args.every,
                             only_when_watched=config != "forced")
        callbacks.append(viewer)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=callbacks)
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_seconds = time.perf_counter() - started
    steps = [b - a for a, b in zip(clock.ends[args.warmup:], clock.ends[args.warmup + 1:], strict=False)]
    viewer_seconds = viewer.seconds if viewer else 0.0
    return {"step_ms": 1000 * statistics.fmean(steps), "viewer_ms": 1000 * viewer_seconds,
            "viewer_pct": 100 * viewer_seconds / fit_seconds,
            "start_ms": 1000 * (viewer.start_seconds if viewer else 0.0),
            "refreshes": float(viewer.refreshes if viewer else 0),
            "gaussians": float(module.gaussians["means"].shape[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--every", type=int, default=LiveViewer().every_n_steps, help="refresh interval (steps)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args()
    if "page" in args.configs and not args.browser:
        parser.error("--configs page needs Chromium (apt-get install chromium, or --browser PATH)")
    recipe = yaml.safe_load((REPO / "recipes" / "gaussian" / "colmap.yaml").read_text())
    data = GaussianSplattingDataModule(**{**recipe["data"]["init_args"],
                                          "path": str(Path(args.data_root) / "colmap_blocks")})
    data.setup("fit")
    print(f"steps {args.steps}, refresh every {args.every} steps, {len(data.train_cameras())} training views")
    run("off", recipe, data, argparse.Namespace(**{**vars(args), "steps": args.warmup + 2}))  # builds, caches: untimed
    for round_index in range(args.repeats):
        results = {config: run(config, recipe, data, args) for config in args.configs}
        for config, values in results.items():
            for name, value in values.items():
                print(f"RESULT round{round_index}.{config}.{name} {value:.3f}")
            if "off" in results and config != "off":
                overhead = 100 * (values["step_ms"] / results["off"]["step_ms"] - 1)
                print(f"RESULT round{round_index}.{config}.overhead_pct {overhead:.2f}")


if __name__ == "__main__":
    main()

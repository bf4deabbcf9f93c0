"""Wall time to the foundation PSNR when training with the cpp rasterizer against the torch one.

Both backends train the ``gaussian/blender`` recipe at 400x400 from the same seed, one after the
other in this process. The training clock pauses while the first ``--test-views`` held-out views are
rendered for PSNR, which happens every ``--probe-seconds`` of training (the first step, with its
one-off start-up costs, is not timed). cpp trains until its test PSNR reaches ``--target`` (24 dB,
the foundation issue's target); torch then trains for ``--torch-factor`` times that wall time, or
until it reaches the target itself. The table's seconds per step average each run's own steps; the
``torch_over_cpp_seconds_per_step`` ratio compares torch's steps with cpp's first as many steps
(same schedule), because early steps, with the large initial Gaussians, cost the most.

    python benchmarks/training_backends.py [--quick] [--data ../shared/data/nerf_synthetic_blocks]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import lightning as L
import torch
import yaml

from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.densify import DensifyConfig
from lightning_grendel.splatting.metrics import psnr
from lightning_grendel.splatting.module import GaussianSplattingModule, cameras_from_batch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "gaussian" / "blender.yaml"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "nerf_synthetic_blocks"


class PSNRProbe(L.Callback):
    """Measures test PSNR on a training clock that excludes the probes; stops at the target or the budget.

    The clock starts after the first step (one-off start-up costs) and counts steps from there. Besides
    every ``every_s`` seconds, it also probes at the first step past ``mark_s`` (cpp's time to target).
    """

    def __init__(self, views: dict, every_s: float, target: float, budget_s: float, mark_s: float = -1.0) -> None:
        self.views, self.every_s, self.target, self.budget_s, self.mark_s = views, every_s, target, budget_s, mark_s
        self.history: list[tuple[int, float, float]] = []  # (steps after the first, training seconds, test PSNR)
        self._began: float | None = None
        self._paused = self._next = 0.0
        self._first_step = 0

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: object) -> None:
        if self._began is None:
            self._began, self._next, self._first_step = time.perf_counter(), self.every_s, trainer.global_step
            return
        clock = time.perf_counter() - self._began - self._paused
        passed_mark = 0 <= self.mark_s <= clock
        if clock < self._next and clock < self.budget_s and not passed_mark:
            return
        self._next = clock + self.every_s
        self.mark_s = -1.0 if passed_mark else self.mark_s
        self._probe(trainer, module, clock)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """A last probe where training ended between probes (e.g. at ``max_steps``), so no run has none."""
        if self._began is None:
            return
        if not self.history or self.history[-1][0] != trainer.global_step - self._first_step:
            self._probe(trainer, module, time.perf_counter() - self._began - self._paused)

    def _probe(self, trainer: L.Trainer, module: L.LightningModule, clock: float) -> None:
        probe_start = time.perf_counter()
        renders = module.render_views(cameras_from_batch(self.views))
        value = float(torch.stack([psnr(r, t) for r, t in zip(renders, self.views["image"], strict=True)]).mean())
        self._paused += time.perf_counter() - probe_start
        steps = trainer.global_step - self._first_step
        self.history.append((steps, clock, value))
        print(f"  step {steps:5d}  {clock:7.1f} s  test PSNR {value:6.2f} dB", flush=True)
        if value >= self.target or clock >= self.budget_s:
            trainer.should_stop = True


def train(backend: str, data: GaussianSplattingDataModule, views: dict, args: argparse.Namespace,
          budget_s: float, mark_s: float = -1.0) -> PSNRProbe:
    recipe = yaml.safe_load(RECIPE.read_text())["model"]["init_args"]
    densify = DensifyConfig(**recipe.pop("densify"))
    L.seed_everything(0, verbose=False)
    module = GaussianSplattingModule(**recipe, densify=densify, backend=backend, export_ply=False)
    probe = PSNRProbe(views, args.probe_seconds, args.target, budget_s, mark_s)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.max_steps, logger=False, callbacks=[probe],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    print(f"{backend}:", flush=True)
    trainer.fit(module, datamodule=data)
    return probe


def cpp_seconds_for(history: list[tuple[int, float, float]], steps: int) -> float:
    """Training seconds cpp took for its first ``steps`` steps (linear between probes).

    Early steps cost more than late ones (the initial Gaussians are large), so per-step times are
    compared over the same steps: torch's whole run against cpp's start.
    """
    previous_steps, previous_seconds = 0, 0.0
    for step, seconds, _ in history:
        if step >= steps:
            share = (steps - previous_steps) / max(step - previous_steps, 1)
            return previous_seconds + share * (seconds - previous_seconds)
        previous_steps, previous_seconds = step, seconds
    return previous_seconds * steps / max(previous_steps, 1)


def first_reaching(history: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    return next(((step, seconds) for step, seconds, value in history if value >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--width", type=int, default=400)
    parser.add_argument("--target", type=float, default=24.0, help="test PSNR to reach (dB)")
    parser.add_argument("--test-views", type=int, default=8)
    parser.add_argument("--probe-seconds", type=float, default=15.0, help="training seconds between PSNR probes")
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--torch-factor", type=float, default=1.5, help="torch's budget in multiples of cpp's time")
    parser.add_argument("--quick", action="store_true", help="64x64, 3 test views, a 2-second budget (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.width, args.test_views, args.probe_seconds, args.max_steps = 64, 3, 1.0, 30
    if not Path(args.data, "transforms_train.json").is_file():
        raise SystemExit(f"{args.data}: no NeRF-synthetic scene there (pass --data)")
    data_args = yaml.safe_load(RECIPE.read_text())["data"]["init_args"]
    data = GaussianSplattingDataModule(**{**data_args, "path": args.data, "image_width": args.width})
    data.setup("fit")
    test = data.test_dataloader().dataset
    views = torch.utils.data.default_collate([test[i] for i in range(min(args.test_views, len(test)))])

    cpp = train("cpp", data, views, args, budget_s=1e9 if not args.quick else 2.0)
    reached = first_reaching(cpp.history, args.target)
    cpp_seconds = reached[1] if reached else cpp.history[-1][1]
    torch_run = train("torch", data, views, args, budget_s=args.torch_factor * cpp_seconds, mark_s=cpp_seconds)
    torch_reached = first_reaching(torch_run.history, args.target)

    def seconds_per_step(history: list[tuple[int, float, float]]) -> float:
        return history[-1][1] / max(history[-1][0], 1)

    at_cpp_time = next((v for _, s, v in torch_run.history if s >= cpp_seconds), torch_run.history[-1][2])
    torch_steps, torch_seconds, _ = torch_run.history[-1]
    ratio = torch_seconds / cpp_seconds_for(cpp.history, torch_steps)
    print(f"\nBlender scene at {args.width}x{args.width}, target test PSNR {args.target} dB "
          f"(first {len(views['image'])} test views), training time excludes the probes")
    print("| backend | steps | training s | test PSNR reached | s / step | reached target at |")
    print("|---|---|---|---|---|---|")
    for name, run, hit in (("cpp", cpp, reached), ("torch", torch_run, torch_reached)):
        step, seconds, value = run.history[-1]
        when = f"step {hit[0]}, {hit[1]:.0f} s" if hit else f"not reached in {seconds:.0f} s"
        print(f"| {name} | {step} | {seconds:.0f} | {max(v for *_, v in run.history):.2f} | "
              f"{seconds_per_step(run.history):.3f} | {when} |")
    print(f"RESULT training.cpp_seconds_to_target={cpp_seconds:.1f}")
    print(f"RESULT training.torch_psnr_at_cpp_time={at_cpp_time:.2f}")
    print(f"RESULT training.torch_over_cpp_seconds_per_step={ratio:.2f}")


if __name__ == "__main__":
    main()

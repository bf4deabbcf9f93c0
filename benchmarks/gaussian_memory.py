"""Bytes per Gaussian while training, against the floor of parameters + gradients + two Adam moments.

Usage: ``python benchmarks/gaussian_memory.py [--gaussians 250000 1000000 4000000] [--width 640] [--steps 6]``.

Each count runs in its own process (one at a time: 4M Gaussians take several GB): the real
``GaussianSplattingModule`` (SH degree 3, the cpp rasterizer, Adam fused, the finite guard, densification
statistics accumulating but no densification) is fitted by a Lightning ``Trainer`` on a few views of the demo
scene at ``--width`` x 9/16, initialised from N points on its surfaces. ``PhaseProbe`` reads ``VmRSS`` and
``VmHWM`` (peak RSS, reset through ``/proc/self/clear_refs``) at every hook of the step, so each phase's
peak is known: forward (projection, rasterization, loss), backward, the guard and statistics before the
step, and Adam's step with what follows it. The baseline is the RSS before the Gaussians exist (libraries,
scene, C++ extensions loaded); the figure is the peak RSS of the training steps minus the baseline, over N.
The floor is 59 floats x 4 bytes x 4 (parameter, gradient, two moments) = 944 bytes.
Prints a table and ``RESULT gaussians.bytes_over_floor_<count>`` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

FLOOR = 59 * 4 * 4
PHASES = ("forward", "backward", "before_step", "step")


def status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Peak RSS (VmHWM) := current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def child(count: int, width: int, steps: int, out: Path) -> None:
    """One measured run in this process: writes the probe's numbers to ``out`` (JSON)."""
    from lightning.pytorch import Callback, LightningDataModule, Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_grendel import GaussianSplattingModule
    from lightning_grendel.splatting.data.demo_scene import orbit_cameras, render_views, surface_points
    from lightning_grendel.splatting.densify import DensifyConfig
    from lightning_grendel.splatting.fused_projection import load_extension as load_projection
    from lightning_grendel.splatting.fused_ssim import load_extension as load_ssim
    from lightning_grendel.splatting.rasterize.cpp_backend import load_extension as load_rasterizer

    height = round(width * 9 / 16)
    generator = torch.Generator().manual_seed(0)
    cameras = orbit_cameras(4, width, height, generator)
    images = render_views(cameras, supersample=1).to(torch.float32) / 255.0
    points, colors = surface_points(cameras, count, generator)

    class Views(LightningDataModule):
        batch_size = 1

        def initial_points(self) -> tuple[torch.Tensor, torch.Tensor]:
            return points, colors

        def train_cameras(self) -> Any:
            return cameras

        @property
        def background(self) -> torch.Tensor:
            return torch.zeros(3)

        def train_dataloader(self) -> DataLoader:
            index = torch.arange(len(cameras))
            dataset = TensorDataset(images, cameras.world_to_camera, cameras.intrinsics, index)
            return DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=lambda rows: {
                "image": torch.stack([r[0] for r in rows]), "world_to_camera": torch.stack([r[1] for r in rows]),
                "intrinsics": torch.stack([r[2] for r in rows]), "index": torch.stack([r[3] for r in rows])})

    class PhaseProbe(Callback):
        def __init__(self) -> None:
            self.baseline = 0
            self.resting: list[int] = []
            self.peaks: dict[str, list[int]] = {phase: [] for phase in PHASES}

        def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
            for load in (load_projection, load_rasterizer, load_ssim):  # their code is not the Gaussians'
                assert load() is not None, "a C++ extension did not build"
            self.baseline = status_kib("VmRSS")

        def _phase(self, phase: str) -> None:
            self.peaks[phase].append(status_kib("VmHWM"))
            reset_peak()

        def on_train_batch_start(self, *args: Any) -> None:
            self.resting.append(status_kib("VmRSS"))
            reset_peak()

        def on_before_backward(self, *args: Any) -> None:
            self._phase("forward")

        def on_after_backward(self, *args: Any) -> None:
            self._phase("backward")

        def on_before_optimizer_step(self, *args: Any) -> None:
            self._phase("before_step")

        def on_train_batch_end(self, *args: Any) -> None:
            self._phase("step")

    probe = PhaseProbe()
    no_densification = DensifyConfig(start_images=10**9, opacity_reset_every_images=0)  # statistics still accumulate
    module = GaussianSplattingModule(sh_degree=3, sh_degree_interval=0, total_images=steps, export_ply=False,
                                     backend="cpp", densify=no_densification)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[probe])
    trainer.fit(module, Views())
    out.write_text(json.dumps({"count": module.gaussians["means"].shape[0], "baseline_kib": probe.baseline,
                               "resting_kib": probe.resting, "peaks_kib": probe.peaks}))


def measure(count: int, width: int, steps: int, threads: int) -> dict:
    out = Path(f"/tmp/gaussian_memory_{os.getpid()}_{count}.json")
    command = [sys.executable, __file__, "--child", str(count), "--width", str(width), "--steps", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run([*command, "--out", str(out)], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{count} Gaussians failed:\n{result.stderr[-4000:]}")
    data = json.loads(out.read_text())
    out.unlink()
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaussians", type=int, nargs="+", default=[250_000, 1_000_000, 4_000_000])
    parser.add_argument("--width", type=int, default=640, help="view width (height 9/16 of it; default 640)")
    parser.add_argument("--steps", type=int, default=6, help="training steps (default 6; the first creates Adam's "
                        "moments)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="20,000 Gaussians, 160 px, 3 steps (a smoke run)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.width, args.steps, args.out)
        return
    if args.quick:
        args.gaussians, args.width, args.steps = [20_000], 160, 3
    print(f"Peak RSS while training, SH degree 3, one {args.width}x{round(args.width * 9 / 16)} view per step, "
          f"{args.steps} steps, {args.threads} threads; bytes per Gaussian above the RSS before the Gaussians "
          f"(floor {FLOOR})")
    print("| Gaussians | baseline (MiB) | peak per Gaussian (B) | / floor | resting | forward | backward | "
          "before step | Adam step |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    for count in args.gaussians:
        data = measure(count, args.width, args.steps, args.threads)
        n, base = data["count"], data["baseline_kib"]
        per = {phase: (max(values) - base) * 1024 / n for phase, values in data["peaks_kib"].items()}
        resting = (max(data["resting_kib"]) - base) * 1024 / n  # from the second step on, with Adam's moments
        peak = max(per.values())
        results[count] = peak
        cells = " | ".join(f"{per[phase]:.0f}" for phase in PHASES)
        print(f"| {n:,} | {base / 1024:.0f} | {peak:.0f} | {peak / FLOOR:.2f} | {resting:.0f} | {cells} |", flush=True)
    for count, peak in results.items():
        label = f"{count / 1e6:g}m" if count >= 1_000_000 else f"{count // 1000}k"
        print(f"RESULT gaussians.bytes_over_floor_{label}={peak / FLOOR:.3f}")


if __name__ == "__main__":
    main()

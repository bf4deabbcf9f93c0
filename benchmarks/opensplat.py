"""Seconds per training step of OpenSplat's CPU trainer against this project's, measured in one run.

Both trainers fit ``colmap_blocks`` at its full 480x360 from COLMAP's 13,454 points, SH degree 0, no
densification (no pruning, no opacity reset), loss L1 + 0.2 D-SSIM, Adam, ``--threads`` threads. Each runs
``--short`` and then ``--long`` steps as separate runs, the trainers alternating; the time per step is
``(t_long - t_short) / (long - short)``, which cancels the start-up (decoding images, building the model,
OpenSplat writing its PLY). The medians over ``--repeats`` are reported, with their ratio.

OpenSplat is no dependency of this project: build its CPU trainer from its source (the commands are in
``docs/results/opensplat.md``) and pass the binary with ``--opensplat`` or ``$OPENSPLAT``. Without one
the script says so and exits 0. OpenSplat's ``--num-downscales 0`` keeps it at full resolution (its
default trains at a quarter of the size first); ``--warmup-length`` past the run turns off densification.

    python benchmarks/opensplat.py --opensplat /tmp/opensplat_build/opensplat [--data ../shared/data/colmap_blocks]
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lightning as L  # noqa: E402 - the OpenMP policy is read when torch loads
import torch  # noqa: E402

import lightning_grendel  # noqa: E402
from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule  # noqa: E402
from lightning_grendel.splatting.densify import DensifyConfig  # noqa: E402
from lightning_grendel.splatting.losses import strip_loss  # noqa: E402
from lightning_grendel.splatting.module import GaussianSplattingModule, cameras_from_batch  # noqa: E402
from lightning_grendel.splatting.rasterize import rasterize  # noqa: E402
from lightning_grendel.splatting.render import splat_gaussians  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "colmap_blocks"
NO_DENSIFY = 10**9  # OpenSplat's --warmup-length: refinement (densify, prune, opacity reset) never starts


def step_seconds(short_steps: int, short_s: float, long_steps: int, long_s: float) -> float:
    """Seconds per step from two runs of one trainer; their fixed start-up cost cancels."""
    if long_steps <= short_steps:
        raise ValueError(f"--long ({long_steps}) must exceed --short ({short_steps})")
    return (long_s - short_s) / (long_steps - short_steps)


def ply_vertex_count(path: Path) -> int:
    """The ``element vertex`` count of a PLY header (how many Gaussians OpenSplat ended with)."""
    with path.open("rb") as handle:
        for raw in handle:
            line = raw.decode("ascii", errors="replace").strip()
            if line.startswith("element vertex "):
                return int(line.split()[2])
            if line == "end_header":
                break
    raise ValueError(f"{path}: no 'element vertex' line in the PLY header")


def find_opensplat(given: str | None) -> Path | None:
    """The OpenSplat binary from ``--opensplat``, ``$OPENSPLAT`` or ``PATH``; None when there is none."""
    name = given or os.environ.get("OPENSPLAT") or shutil.which("opensplat")
    if name is None:
        return None
    path = Path(name)
    if not (path.is_file() and os.access(path, os.X_OK)):
        source = "--opensplat" if given else "$OPENSPLAT"
        raise SystemExit(f"{source}: {name} is not an executable file (build OpenSplat, see docs/results/opensplat.md)")
    return path


def run_opensplat(binary: Path, data: Path, steps: int, threads: int, expected_gaussians: int) -> float:
    """Wall seconds of one OpenSplat CPU run of ``steps`` steps (checks it kept every Gaussian)."""
    with tempfile.TemporaryDirectory(prefix="opensplat_bench_") as out:
        output = Path(out) / "splat.ply"
        command = [str(binary), str(data), "--cpu", "-n", str(steps), "-o", str(output),
                   "--num-downscales", "0", "-d", "1", "--sh-degree", "0", "--ssim-weight", "0.2",
                   "--warmup-length", str(NO_DENSIFY)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=out)
        seconds = time.perf_counter() - start
        if result.returncode != 0 or "Using CPU" not in result.stdout:
            raise SystemExit(f"{binary} failed (exit {result.returncode}): {' '.join(command)}\n"
                             f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
        count = ply_vertex_count(output)
        if count != expected_gaussians:
            raise SystemExit(f"OpenSplat ended with {count} Gaussians, expected {expected_gaussians} (densified?)")
    return seconds


def run_ours(data: GaussianSplattingDataModule, steps: int, backend: str) -> tuple[float, GaussianSplattingModule]:
    """Wall seconds of ``trainer.fit`` for ``steps`` steps of GaussianSplattingModule (same settings), and it."""
    off = DensifyConfig(stop_images=0, every_images=0, opacity_reset_every_images=0)
    L.seed_everything(0, verbose=False)
    module = GaussianSplattingModule(sh_degree=0, ssim_weight=0.2, total_images=steps, densify=off,
                                     backend=backend, export_ply=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    if module.gaussians["means"].shape[0] != data.initial_points()[0].shape[0]:
        raise RuntimeError("lightning_grendel changed the number of Gaussians with densification off")
    return seconds, module


def median_seconds(work, repeats: int = 5) -> float:
    """Median wall seconds of ``work()`` after one untimed call."""
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_parts(module: GaussianSplattingModule, data: GaussianSplattingDataModule, backend: str) -> dict[str, float]:
    """Seconds (forward + backward) of a training step's three stages on the trained model and one view.

    Also used by ``colmap_time_to_psnr.py``; colours are evaluated at the module's active SH degree.

    ``projection_sh``: projecting the Gaussians and evaluating their colours; ``rasterize``: the
    rasterizer alone on those splats; ``loss``: L1 + 0.2 D-SSIM on its image. Optimiser, densification
    bookkeeping and Lightning make up the rest of a step.
    """
    batch = next(iter(data.train_dataloader()))
    cameras = cameras_from_batch(batch)
    target = batch["image"][0]
    height, width = target.shape[:2]
    params = {k: v.detach().clone().requires_grad_(True) for k, v in module.gaussians.items()}
    background = module.background
    degree = module.active_sh_degree
    splats = splat_gaussians(params, cameras, degree).camera(0)
    trained = ("means2d", "conics", "colors", "opacities")
    weights = {k: torch.randn_like(getattr(splats, k)) for k in trained}

    def projection_sh() -> None:
        out = splat_gaussians(params, cameras, degree).camera(0)
        sum((getattr(out, k) * w).sum() for k, w in weights.items()).backward()

    leaves = {k: getattr(splats, k).detach().requires_grad_(k in trained) for k in (*trained, "depths", "radii")}

    def render() -> torch.Tensor:
        return rasterize(**leaves, width=width, height=height, background=background, backend=backend)

    def rasterize_only() -> None:
        render().sum().backward()

    image = render().detach().requires_grad_(True)

    def loss_only() -> None:
        strip_loss(image, target, 0, height, width * height * 3, 0.2).backward()

    return {"projection_sh": median_seconds(projection_sh), "rasterize": median_seconds(rasterize_only),
            "loss": median_seconds(loss_only)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--opensplat", help="OpenSplat binary (default: $OPENSPLAT, then opensplat on PATH)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="COLMAP dataset (images/ + sparse/0)")
    parser.add_argument("--short", type=int, default=20, help="steps of the short run")
    parser.add_argument("--long", type=int, default=100, help="steps of the long run")
    parser.add_argument("--repeats", type=int, default=2, help="short+long pairs per trainer (medians reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="cpp", help="this project's rasterizer backend")
    args = parser.parse_args()
    binary = find_opensplat(args.opensplat)
    if binary is None:
        print("SKIP opensplat: no OpenSplat binary (pass --opensplat PATH or set $OPENSPLAT; "
              "build instructions in docs/results/opensplat.md)")
        return
    data_path = Path(args.data)
    if not (data_path / "sparse" / "0").is_dir() or not (data_path / "images").is_dir():
        raise SystemExit(f"--data: {data_path} holds no COLMAP model (images/ and sparse/0)")
    step_seconds(args.short, 0.0, args.long, 0.0)  # rejects --long <= --short before anything runs
    torch.set_num_threads(args.threads)

    data = GaussianSplattingDataModule(path=str(data_path), format="colmap")  # full size: 480x360
    data.setup("fit")
    gaussians = data.initial_points()[0].shape[0]
    height, width = data.scene.train.images.shape[1:3]
    print(f"lightning_grendel from {Path(lightning_grendel.__file__).parent}; OpenSplat {binary}")
    print(f"{data_path.name}: {width}x{height}, {gaussians} Gaussians from COLMAP's points, SH degree 0, "
          f"no densification, {args.threads} threads, steps {args.short} and {args.long}", flush=True)
    run_ours(data, 2, args.backend)  # builds or loads the C++ extension outside the timings

    per_step: dict[str, list[float]] = {"opensplat": [], "lightning_grendel": []}
    for repeat in range(args.repeats):
        times: dict[tuple[str, int], float] = {}
        for steps in (args.short, args.long):
            times["opensplat", steps] = run_opensplat(binary, data_path, steps, args.threads, gaussians)
            times["lightning_grendel", steps], module = run_ours(data, steps, args.backend)
        for name in per_step:
            value = step_seconds(args.short, times[name, args.short], args.long, times[name, args.long])
            per_step[name].append(value)
            print(f"  repeat {repeat}: {name:17s} {times[name, args.short]:7.1f} s / {args.short} steps, "
                  f"{times[name, args.long]:7.1f} s / {args.long} steps -> {value:.3f} s/step", flush=True)
    theirs, ours = statistics.median(per_step["opensplat"]), statistics.median(per_step["lightning_grendel"])
    print(f"RESULT opensplat.step_s={theirs:.3f}")
    print(f"RESULT lightning_grendel.step_s={ours:.3f}")
    print(f"RESULT opensplat.speedup={theirs / ours:.2f}")
    parts = step_parts(module, data, args.backend)
    print("lightning_grendel's step, stage by stage (forward + backward, one view, the trained model):")
    for name, seconds in parts.items():
        print(f"  {name:14s} {seconds * 1e3:7.1f} ms  {seconds / ours:6.1%} of the {ours * 1e3:.0f} ms step")
    print(f"RESULT lightning_grendel.projection_sh_fraction={parts['projection_sh'] / ours:.3f}")


if __name__ == "__main__":
    main()

"""Wall time to quality: today's 3DGS recipes against coarse-to-fine training with a sparse Adam step.

Issue 33 item 4 asks whether DashGaussian's schedule halves the time to a recipe's final quality here.
For each dataset this trains the shipped recipe's model and data settings (``gaussian/colmap`` on
``colmap_blocks``, ``gaussian/blender`` on ``nerf_synthetic_blocks``), from its seed, twice in this
process, one run after the other:

- ``today``: the recipe as shipped;
- ``new``: the same recipe plus ``coarse_to_fine`` (resolution from the training images' spectrum, full
  size by ``--full-at`` of the recipe's images, the growth budget set to ``today``'s final Gaussian count,
  so the new run never ends with more) and ``sparse_adam``; with ``--dense-adam``, the module's fused
  dense Adam instead (the schedule alone).

The training clock is ``training_backends.PSNRProbe``'s: it starts after the first step and pauses while
the test views are rendered (at full size) every ``--probe-seconds``, so a time to a PSNR is known to
within one probe interval. Both runs train the recipe's ``max_steps``. Printed: each run's final test
PSNR, final Gaussian count and training seconds, the time each needs to reach ``today``'s final test PSNR
(and 28 dB on COLMAP), and

    RESULT time_to_quality.ratio_<dataset>       new time over today's to today's final test PSNR (target <= 0.5)
    RESULT time_to_quality.psnr_delta_<dataset>  new final test PSNR minus today's (target >= -0.1)

(with ``--dense-adam`` their names end in ``_dense_adam``).

By default one call trains both runs of each dataset. On a shared machine each timed run can hold the
shared lock alone (``--run today`` then ``--run new``, alternating); the runs are kept in ``--results``
(a JSON file per dataset), ``new`` reads ``today``'s Gaussian count from it, and the table is printed
once both are there:

    flock /tmp/lg_bench.lock python benchmarks/time_to_quality.py --dataset colmap --run today
    flock /tmp/lg_bench.lock python benchmarks/time_to_quality.py --dataset colmap --run new

``--quick`` (64 px, 2 test views, 16 steps) only checks that the script runs; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import lightning as L
import torch
import yaml
from training_backends import PSNRProbe, first_reaching

from lightning_grendel.splatting.coarse_to_fine import CoarseToFine
from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.densify import DensifyConfig
from lightning_grendel.splatting.module import GaussianSplattingModule

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
DATASETS = {"colmap": ("colmap.yaml", "colmap_blocks"), "blender": ("blender.yaml", "nerf_synthetic_blocks")}
COLMAP_TARGET = 28.0  # the COLMAP recipe's time-to-PSNR target (benchmarks/colmap_time_to_psnr.py)


def train(recipe: dict, data: GaussianSplattingDataModule, views: dict, args: argparse.Namespace,
          extra: dict) -> tuple[PSNRProbe, int]:
    """One run of the recipe's model with ``extra`` options; its probe history and final Gaussian count."""
    model_args = dict(recipe["model"]["init_args"])
    densify = DensifyConfig(**model_args.pop("densify"))
    L.seed_everything(recipe["seed_everything"], verbose=False)
    module = GaussianSplattingModule(**model_args, densify=densify, backend="cpp", export_ply=False, **extra)
    probe = PSNRProbe(views, args.probe_seconds, float("inf"), budget_s=float("inf"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.max_steps, logger=False, callbacks=[probe],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    return probe, int(module.gaussians["means"].shape[0])


def run_dataset(name: str, args: argparse.Namespace) -> None:
    recipe_file, folder = DATASETS[name]
    recipe = yaml.safe_load((REPO / "recipes" / "gaussian" / recipe_file).read_text())
    data_args = dict(recipe["data"]["init_args"])
    path = Path(args.data_root) / folder
    if not path.is_dir():
        raise SystemExit(f"{path}: no such dataset (pass --data-root, the folder holding {folder})")
    results_file = Path(args.results.format(dataset=name))
    results = json.loads(results_file.read_text()) if results_file.is_file() and args.run != "both" else {}
    if args.run == "new" and "today" not in results:
        raise SystemExit(f"{results_file}: no today run of {name} yet (run --run today first)")
    max_steps = args.max_steps or recipe["trainer"]["max_steps"]
    test_views = None
    if args.quick:
        data_args["image_width"], test_views, max_steps = 64, 2, 16
    args = argparse.Namespace(**{**vars(args), "max_steps": max_steps})
    data = GaussianSplattingDataModule(**{**data_args, "path": str(path)})
    data.setup("fit")
    test = data.test_dataloader().dataset
    views = torch.utils.data.default_collate([test[i] for i in range(min(test_views or len(test), len(test)))])

    images = max_steps * data_args.get("batch_size", 1)
    for run in ("today", "new") if args.run == "both" else (args.run,):
        extra: dict = {}
        if run == "new":
            schedule = CoarseToFine(full_resolution_images=int(args.full_at * images),
                                    energy_tolerance=args.tolerance, max_factor=args.max_factor,
                                    growth_budget=results["today"]["gaussians"])
            extra = {"coarse_to_fine": schedule, "sparse_adam": not args.dense_adam}
        print(f"{name}: {run} {extra}", flush=True)
        probe, count = train(recipe, data, views, args, extra)
        key = "new_dense_adam" if run == "new" and args.dense_adam else run  # both kinds of new run are kept
        results[key] = {"history": probe.history, "gaussians": count}
        if args.run != "both":
            results_file.write_text(json.dumps(results))
    new = "new_dense_adam" if args.dense_adam else "new"
    if "today" in results and new in results:
        report(name, results, new, views, max_steps, args)


def report(name: str, results: dict, new: str, views: dict, max_steps: int, args: argparse.Namespace) -> None:
    """The table and RESULT lines of today's run against the ``new`` one (``new`` or ``new_dense_adam``)."""
    final = {run: results[run]["history"][-1] for run in ("today", new)}
    target = final["today"][2]
    targets = [target] + ([COLMAP_TARGET] if name == "colmap" else [])
    height, width = views["image"].shape[1:3]
    suffix = new[3:]
    print(f"\n{name} recipe at {width}x{height}, {max_steps} steps, {args.threads} threads; test PSNR on "
          f"{len(views['image'])} test views; seconds are training seconds after the first step, without probes")
    header = " | ".join(f"s to {t:.2f} dB" for t in targets)
    print(f"| run | steps | training s | final test PSNR | Gaussians | {header} |")
    print("|---|---|---|---|---|" + "---|" * len(targets))
    reached: dict[str, dict[float, float | None]] = {}
    for run in ("today", new):
        steps, seconds, value = final[run]
        history = [tuple(entry) for entry in results[run]["history"]]
        reached[run] = {t: (hit[1] if (hit := first_reaching(history, t)) else None) for t in targets}
        cells = " | ".join("not reached" if s is None else f"{s:.1f}" for s in reached[run].values())
        print(f"| {run} | {steps} | {seconds:.1f} | {value:.2f} | {results[run]['gaussians']} | {cells} |")
    for t in targets:
        today_s, new_s = reached["today"][t], reached[new][t]
        label = ("" if t == target else f"_{t:g}db") + suffix
        ratio = "not_reached" if today_s is None or new_s is None else f"{new_s / max(today_s, 1e-9):.3f}"
        print(f"RESULT time_to_quality.ratio_{name}{label}={ratio}")
    print(f"RESULT time_to_quality.psnr_delta_{name}{suffix}={final[new][2] - target:.3f}")
    print(f"RESULT time_to_quality.gaussians_{name}{suffix}={results[new]['gaussians']}/"
          f"{results['today']['gaussians']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=[*DATASETS, "both"], default="both")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"),
                        help="the folder holding colmap_blocks and nerf_synthetic_blocks")
    parser.add_argument("--max-steps", type=int, default=None, help="steps per run (default: the recipe's)")
    parser.add_argument("--full-at", type=float, default=0.5,
                        help="fraction of the recipe's images by which the new run renders at full size")
    parser.add_argument("--tolerance", type=float, default=0.1, help="CoarseToFine.energy_tolerance")
    parser.add_argument("--max-factor", type=int, default=4, help="CoarseToFine.max_factor")
    parser.add_argument("--run", choices=["both", "today", "new"], default="both",
                        help="train both runs, or one (kept in --results for the other)")
    parser.add_argument("--results", default=str(Path(tempfile.gettempdir()) / "time_to_quality_{dataset}.json"),
                        help="where single runs are kept ({dataset} is replaced)")
    parser.add_argument("--dense-adam", action="store_true", help="the new run keeps the fused dense Adam")
    parser.add_argument("--probe-seconds", type=float, default=3.0, help="training seconds between PSNR probes")
    parser.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads")
    parser.add_argument("--quick", action="store_true", help="64 px, 2 test views, 16 steps (a smoke run)")
    args = parser.parse_args()
    if args.threads < 1 or args.probe_seconds <= 0 or not 0 <= args.full_at <= 1:
        parser.error("--threads must be at least 1, --probe-seconds positive and --full-at in [0, 1]")
    if args.quick:
        args.probe_seconds = 0.5
    torch.set_num_threads(args.threads)
    for name in DATASETS if args.dataset == "both" else (args.dataset,):
        run_dataset(name, args)


if __name__ == "__main__":
    main()

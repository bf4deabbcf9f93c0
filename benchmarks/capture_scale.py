"""Captures the size users bring: peak memory per rank against the number of 1080p views, what W ranks of a
host hold together, and the step time of streamed images against all-in-memory ones.

A synthetic COLMAP capture (``capture_support/synthetic.py``: the demo scene ray-cast at a low resolution,
upsampled to 1920x1080 with sensor noise, JPEG quality 90) is written to ``--work`` once; the 100- and
1000-view captures are its first views (same files). Every run is the CLI's ``fit`` in its own process,
with a config written here (``GaussianSplattingModule`` at SH degree 3 on the capture's points,
densification off so the Gaussian count stays put; ``capture_support.probe.StepProbe`` records the numbers).

1. **Flat in views**: one process streams (``image_storage: stream``, a ``--budget-mib`` memory cache, the
   disk cache) and trains ``--steps`` steps at 100, 1000 and 3000 views; its peak RSS, the budget subtracted,
   over the 100-view one is ``RESULT capture.rss_ratio_3000_vs_100``. The in-memory path would hold
   N x 6.2 MB (6.2 GB at 1000 views, 18.7 GB at 3000): it is run only at 100 views, where it fits.
2. **Step time**: at 100 views, in-memory and streamed runs alternate (``--ratio-repeats`` each); every
   streamed run starts from an empty disk cache, so each image it uses is decoded (the first epoch, the
   worst case). Median time per step (data loading included) after ``WARMUP`` steps:
   ``RESULT capture.step_ratio_streamed``.
3. **One copy per host**: W = 4 GrendelStrategy ranks stream the 1000-view capture through one disk cache;
   after every step each rank reads the Rss and Pss of its mappings of the cache's files from
   ``/proc/self/smaps``. The 4 ranks' Pss summed (shared pages counted once, a private copy-on-write page
   in full) over one copy of the images they map (the sizes of the distinct files any rank maps), worst
   step: ``RESULT capture.host_copies_w4``. Each rank converts only the rows it renders (a streamed train
   batch reads rows on demand), so a rank's Rss of the cache is about 1/W of that copy.

``--grendel-steps N`` instead runs item 5 of issue 33: the ``gaussian/grendel_cpu`` recipe, W = 4, on the
1000-view 1080p capture for N steps with a sharded checkpoint at the end, and prints per-rank memory.

    python benchmarks/capture_scale.py [--views 100 1000 3000] [--work /tmp/capture_scale] [--keep]
    python benchmarks/capture_scale.py --grendel-steps 300
    python benchmarks/capture_scale.py --quick    # a tiny capture, every phase, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from capture_support.synthetic import disk_bytes, prefix_capture, write_capture  # noqa: E402

PHASES = ("rss", "ratio", "copies")
WARMUP = 5  # steps before the step time is steady (prefetching in its rhythm, allocator warm)
MIB = 1 << 20


def run_config(views_root: Path, folder: Path, steps: int, storage: str, budget: int, cache: Path | None,
               world: int, width: int | None, recipe: dict | None = None) -> dict:
    """The CLI config of one run: densification off, the probe, no validation, no checkpoint (unless the recipe
    has them)."""
    probe = {"class_path": "capture_support.probe.StepProbe",
             "init_args": {"path": str(folder / "probe.json"),
                           "image_cache_dir": None if cache is None or world == 1 else str(cache)}}
    data = {"path": str(views_root), "format": "colmap", "image_width": width, "test_every": 8, "batch_size": 1,
            "image_storage": storage, "image_cache_bytes": budget, "image_disk_cache": cache is not None,
            "image_cache_dir": None if cache is None else str(cache)}
    if recipe is not None:  # item 5: the recipe as it is, on this capture
        config = recipe
        config["trainer"].update({"devices": world, "max_steps": steps, "check_val_every_n_epoch": None,
                                  "val_check_interval": None, "default_root_dir": str(folder / "lightning_logs")})
        config["trainer"]["callbacks"].append(probe)
        config["model"]["init_args"]["total_images"] = steps
        config["data"]["init_args"].update(data)
        return config
    strategy = "auto" if world == 1 else {"class_path": "lightning_grendel.GrendelStrategy",
                                          "init_args": {"timeout_s": 900}}
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": world, "strategy": strategy, "max_steps": steps,
                    "limit_val_batches": 0, "enable_checkpointing": False, "logger": False,
                    "enable_progress_bar": False, "default_root_dir": str(folder), "callbacks": [probe]},
        "model": {"class_path": "lightning_grendel.GaussianSplattingModule",
                  "init_args": {"sh_degree": 3, "sh_degree_interval": 0, "total_images": steps, "export_ply": False,
                                "densify": {"start_images": 10**9, "opacity_reset_every_images": 0}}},
        "data": {"class_path": "lightning_grendel.GaussianSplattingDataModule", "init_args": data},
    }


def fit(config: dict, folder: Path, threads: int) -> dict:
    """Run ``lightning-grendel fit`` on ``config`` in ``folder``; the probe's JSON."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "run.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(threads), "LIGHTNING_GRENDEL_LIVE_VIEWER": "off"}
    command = [sys.executable, "-m", "lightning_grendel", "fit", "--config", str(folder / "run.yaml")]
    print("$ (cd", folder, "&&", " ".join(command[1:]), ")", flush=True)
    began = time.perf_counter()
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"run in {folder} failed:\n{result.stderr[-4000:]}")
    probe = json.loads((folder / "probe.json").read_text())
    probe["wall_s"] = time.perf_counter() - began
    return probe


def step_times(probe: dict) -> list[float]:
    """Seconds per step after the warm-up, rank 0 (data loading included: end to end)."""
    ends = probe["step_ends"][0]
    return [b - a for a, b in zip(ends[WARMUP:], ends[WARMUP + 1 :], strict=False)]


def load() -> str:
    return "load average " + " ".join(f"{value:.1f}" for value in os.getloadavg())


def flat_in_views(capture: Path, work: Path, views: list[int], steps: int, budget: int, width: int | None) -> dict:
    peaks = {}
    for count in views:
        root = prefix_capture(capture, work / f"views_{count}", count)
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        probe = fit(run_config(root, work / f"run_rss_{count}", steps, "stream", budget, cache, 1, width),
                    work / f"run_rss_{count}", threads=2)
        peaks[count] = probe["peak_rss_kib"][0] * 1024
        print(f"views {count}: peak RSS {peaks[count] / MIB:.0f} MiB ({probe['gaussians']} Gaussians, {steps} steps, "
              f"{load()})", flush=True)
    return peaks


def step_ratio(capture: Path, work: Path, views: int, steps: int, repeats: int, budget: int,
               width: int | None) -> dict[str, list[float]]:
    root = prefix_capture(capture, work / f"views_{views}", views)
    times: dict[str, list[float]] = {"memory": [], "stream": []}
    for repeat in range(repeats):
        for storage in ("memory", "stream"):
            cache = work / "cache"
            shutil.rmtree(cache, ignore_errors=True)  # every streamed run decodes what it uses
            folder = work / f"run_{storage}_{repeat}"
            probe = fit(run_config(root, folder, steps, storage, budget, cache if storage == "stream" else None, 1,
                                   width), folder, threads=2)
            times[storage] += step_times(probe)
            print(f"{storage} run {repeat}: median step {statistics.median(step_times(probe)):.3f} s, peak RSS "
                  f"{probe['peak_rss_kib'][0] / 1024:.0f} MiB ({load()})", flush=True)
    return times


def host_copies(capture: Path, work: Path, views: int, steps: int, world: int, budget: int,
                width: int | None) -> dict:
    root = prefix_capture(capture, work / f"views_{views}", views)
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    folder = work / f"run_w{world}"
    probe = fit(run_config(root, folder, steps, "stream", budget, cache, world, width), folder, threads=1)
    pss = [[kib * 1024 for kib in rank] for rank in probe["image_pss_kib"]]
    rss = [[kib * 1024 for kib in rank] for rank in probe["image_rss_kib"]]
    one_copy = probe["image_one_copy_bytes"]
    ratios = [sum(rank[step] for rank in pss) / one_copy[step] for step in range(len(one_copy)) if one_copy[step]]
    return {"probe": probe, "ratio": max(ratios), "final_pss": [rank[-1] for rank in pss],
            "final_rss": [rank[-1] for rank in rss], "one_copy": one_copy[-1]}


def grendel_run(capture: Path, work: Path, views: int, steps: int, budget: int) -> None:
    """Item 5: the grendel_cpu recipe, W = 4, on the 1080p capture, with a sharded checkpoint at the end."""
    from lightning_grendel._recipes import resolve_config

    recipe = yaml.safe_load(Path(resolve_config("gaussian/grendel_cpu")).read_text())
    root = prefix_capture(capture, work / f"views_{views}", views)
    cache = work / "cache"
    folder = work / "run_grendel_cpu_w4"
    recipe["model"]["init_args"]["densify"].update({"max_gaussians": 60_000})
    probe = fit(run_config(root, folder, steps, "stream", budget, cache, 4, None, recipe), folder, threads=1)
    checkpoints = sorted(folder.glob("lightning_logs/**/checkpoints/*"))
    times = step_times(probe)
    print(f"grendel_cpu, W = 4, {views} views at 1920x1080, {steps} steps in {probe['wall_s']:.0f} s "
          f"(median step {statistics.median(times):.2f} s), {probe['gaussians']} Gaussians at the end ({load()})")
    print("| rank | peak RSS (MiB) | final RSS (MiB) | final PSS (MiB) | image cache mapped, RSS / PSS (MiB) |")
    print("|---|---|---|---|---|")
    for rank in range(probe["world_size"]):
        print(f"| {rank} | {probe['peak_rss_kib'][rank] / 1024:.0f} | {probe['final_rss_kib'][rank] / 1024:.0f} | "
              f"{probe['final_pss_kib'][rank] / 1024:.0f} | {probe['image_rss_kib'][rank][-1] / 1024:.0f} / "
              f"{probe['image_pss_kib'][rank][-1] / 1024:.0f} |")
    print(f"sum of final PSS over the ranks: {sum(probe['final_pss_kib']) / 1024:.0f} MiB; "
          f"checkpoint: {checkpoints[-1] if checkpoints else 'MISSING'}")
    print(f"RESULT capture.grendel_w4_peak_rss_mib_max={max(probe['peak_rss_kib']) / 1024:.0f}")
    print(f"RESULT capture.grendel_w4_pss_sum_mib={sum(probe['final_pss_kib']) / 1024:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, nargs="+", default=[100, 1000, 3000], help="capture sizes (views)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per memory run (default 20)")
    parser.add_argument("--ratio-steps", type=int, default=40, help="steps per step-time run (default 40)")
    parser.add_argument("--ratio-repeats", type=int, default=2, help="alternating runs per path (default 2)")
    parser.add_argument("--budget-mib", type=int, default=256, help="image_cache_bytes of streamed runs, MiB")
    parser.add_argument("--world", type=int, default=4, help="ranks of the host-copies run (default 4)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/capture_scale"), help="capture and runs folder")
    parser.add_argument("--keep", action="store_true", help="keep the capture and runs (default: delete them)")
    parser.add_argument("--grendel-steps", type=int, default=0, help="item 5 instead: grendel_cpu W = 4, N steps")
    parser.add_argument("--quick", action="store_true", help="6 views at 96x54, 3 steps, W = 2: a smoke run")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES),
                        help="which measurements (default all; the step ratio is the timed one: run it under the "
                        "benchmark lock, the memory ones need not wait for it)")
    args = parser.parse_args()
    width, height, render = 1920, 1080, 320
    views = sorted(args.views)
    if args.quick:
        width, height, render, views = 96, 54, 48, [3, 6]
        args.steps = args.ratio_steps = WARMUP + 3
        args.ratio_repeats, args.world, args.budget_mib = 1, 2, 1
    budget = args.budget_mib * MIB
    args.work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    largest = max(views[-1], 1000 if args.grendel_steps else 0)
    capture = write_capture(args.work / f"capture_{largest}", largest, width, height, render,
                            points=600 if args.quick else 100_000)
    print(f"capture: {largest} views at {width}x{height}, {disk_bytes(capture) / 1e9:.2f} GB of JPEG on disk "
          f"(ready after {time.perf_counter() - began:.0f} s)", flush=True)
    try:
        if args.grendel_steps:
            grendel_run(capture, args.work, 1000, args.grendel_steps, budget)
            return
        size = None if not args.quick else width
        if "rss" in args.phases:
            peaks = flat_in_views(capture, args.work, views, args.steps, budget, size)
            print("| views | peak RSS (MiB) | minus the cache budget (MiB) |\n|---|---|---|")
            for count, peak in peaks.items():
                print(f"| {count} | {peak / MIB:.0f} | {(peak - budget) / MIB:.0f} |")
            first, last = peaks[views[0]], peaks[views[-1]]
            print(f"RESULT capture.rss_ratio_{views[-1]}_vs_{views[0]}={(last - budget) / (first - budget):.3f}")
        if "ratio" in args.phases:
            times = step_ratio(capture, args.work, views[0], args.ratio_steps, args.ratio_repeats, budget, size)
            medians = {name: statistics.median(values) for name, values in times.items()}
            print(f"step time at {views[0]} views: in memory {medians['memory']:.3f} s, streamed "
                  f"{medians['stream']:.3f} s (medians of {len(times['memory'])} and {len(times['stream'])} steps)")
            print(f"RESULT capture.step_ratio_streamed={medians['stream'] / medians['memory']:.3f}")
        if "copies" in args.phases:
            copies = host_copies(capture, args.work, views[min(1, len(views) - 1)], args.steps, args.world, budget,
                                 size)
            cache_bytes = disk_bytes(args.work / "cache") if (args.work / "cache").is_dir() else 0
            print(f"image cache on disk after the W = {args.world} run: {cache_bytes / 1e9:.2f} GB ({load()})")
            print(f"W = {args.world}: image cache mapped per rank, RSS {[round(v / MIB) for v in copies['final_rss']]} "
                  f"MiB, PSS {[round(v / MIB) for v in copies['final_pss']]} MiB, one copy of the mapped images "
                  f"{copies['one_copy'] / MIB:.0f} MiB (last step); peak RSS per rank "
                  f"{[round(kib / 1024) for kib in copies['probe']['peak_rss_kib']]} MiB")
            print(f"RESULT capture.host_copies_w{args.world}={copies['ratio']:.3f}")
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()

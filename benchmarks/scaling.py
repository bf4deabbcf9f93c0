"""Grendel's headline at CPU scale: more ranks hold more Gaussians under the same per-rank capacity.

Runs the ``gaussian/scaling_w4`` recipe through the CLI for W = 1, 2, 4 gloo processes (same images
seen, same schedule, same capacity per rank), tests each on the held-out views, and writes a markdown
table and a PSNR-vs-Gaussians plot into ``--out``. Commands are printed so each run can be repeated.

    python benchmarks/scaling.py [--quick] [--data ../shared/data/nerf_synthetic_blocks] [--out results/scaling]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "gaussian" / "scaling_w4.yaml"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "nerf_synthetic_blocks"
QUICK_OVERRIDES = [
    "--data.image_width=64", "--data.num_init_points=600", "--trainer.max_steps=6", "--trainer.val_check_interval=6",
    "--model.init_args.total_images=6", "--model.init_args.densify.start_images=1",
    "--model.init_args.densify.every_images=2", "--model.init_args.densify.max_gaussians=400",
    "--trainer.limit_test_batches=2",
]


def _cli(subcommand: str, world: int, data: str, folder: Path, extra: list[str]) -> None:
    command = [sys.executable, "-m", "lightning_grendel", subcommand, "-c", str(RECIPE), f"--data.path={data}",
               f"--trainer.devices={world}", *extra]
    print("$ (cd", folder, "&&", " ".join(command[1:]), ")", flush=True)
    subprocess.run(command, cwd=folder, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_world(world: int, data: str, out: Path, extra: list[str]) -> dict:
    folder = out / f"w{world}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").unlink(missing_ok=True)
    try:
        _cli("fit", world, data, folder, extra)
        checkpoint = sorted((folder / "lightning_logs").glob("scaling/version_*/checkpoints/*.ckpt"))[-1]
        _cli("test", world, data, folder, [*extra, f"--ckpt_path={checkpoint}"])
    except subprocess.CalledProcessError as error:
        raise SystemExit(f"W={world} failed:\n{error.stderr[-4000:]}") from None
    return json.loads((folder / "summary.json").read_text())


def write_outputs(results: dict[int, dict], out: Path) -> str:
    lines = [
        "| W | Gaussians | test PSNR | test SSIM | test LPIPS | fit time (s) | peak memory / rank (MiB) | "
        "exchanged / step (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for world, r in sorted(results.items()):
        test = r.get("test", {})
        lpips = f"{test['test/lpips']:.3f}" if "test/lpips" in test else "n/a (no weights)"
        memory = max(r["peak_rss_bytes_per_rank"]) / 2**20
        lines.append(
            f"| {world} | {r['test_gaussians']} | {test['test/psnr']:.2f} | {test['test/ssim']:.4f} | {lpips} | "
            f"{r['fit_seconds']:.0f} | {memory:.0f} | {r['bytes_sent_per_step'] / 2**20:.2f} |"
        )
    table = "\n".join(lines)
    (out / "scaling.md").write_text(table + "\n")
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    counts = [results[w]["test_gaussians"] for w in sorted(results)]
    psnrs = [results[w]["test"]["test/psnr"] for w in sorted(results)]
    axis.plot(counts, psnrs, "o-")
    for world, x, y in zip(sorted(results), counts, psnrs, strict=True):
        axis.annotate(f"W={world}", (x, y), textcoords="offset points", xytext=(6, 4))
    axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value / 1000:g}k"))
    axis.margins(x=0.15, y=0.15)
    axis.set_xlabel("total Gaussians")
    axis.set_ylabel("test PSNR (dB)")
    axis.set_title("Same per-rank capacity, more ranks")
    figure.tight_layout()
    figure.savefig(out / "psnr_vs_gaussians.png", dpi=120)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="W = 1 and 4, 64 px, 6 steps (a smoke run)")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--out", default="results/scaling")
    args = parser.parse_args()
    if not Path(args.data, "transforms_train.json").is_file():
        raise SystemExit(f"{args.data}: no NeRF-synthetic scene there (pass --data)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    worlds, extra = ([1, 4], QUICK_OVERRIDES) if args.quick else ([1, 2, 4], [])
    results = {world: run_world(world, args.data, out, extra) for world in worlds}
    print(write_outputs(results, out))
    print(f"table and plot in {out}")
    print(f"RESULT scaling.psnr_w1={results[1]['test']['test/psnr']:.3f}")
    print(f"RESULT scaling.psnr_w4={results[4]['test']['test/psnr']:.3f}")
    print(f"RESULT scaling.gaussians_w4_over_w1={results[4]['test_gaussians'] / results[1]['test_gaussians']:.3f}")


if __name__ == "__main__":
    main()

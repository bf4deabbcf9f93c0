"""MCMC vs the default (Inria) densification at equal final Gaussian count and images seen.

For each dataset, the default densification trains first; its final Gaussian count becomes MCMC's
``cap_max``, and MCMC then trains for the same number of images from the same seed and initial
points. Both are evaluated on the held-out test views (PSNR, SSIM) with the cpp rasterizer.
The full run uses 80-pixel-wide images, 500 images seen per run (densification from 83 to 375 images,
every 41; SH degree 1) and 5000 random initial points for Blender (COLMAP starts from its 13 454 SfM
points): about 13 minutes for Blender and 3 for COLMAP on 2 busy CPU cores. ``--quick`` trains the demo
scene for a few steps (a smoke test, not a measurement).

    python benchmarks/densify_strategies.py [--quick] [--data-root ../shared/data]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import lightning as L

from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.densify import DensifyConfig
from lightning_grendel.splatting.mcmc import MCMCConfig
from lightning_grendel.splatting.module import GaussianSplattingModule

DATASETS = {"blender": "nerf_synthetic_blocks", "colmap": "colmap_blocks"}


def _run(data: GaussianSplattingDataModule, densify: DensifyConfig | MCMCConfig, images: int,
         seed: int) -> dict[str, float]:
    L.seed_everything(seed, verbose=False)
    module = GaussianSplattingModule(sh_degree=1, sh_degree_interval=max(images // 3, 1), total_images=images,
                                     densify=densify, export_ply=False, backend="auto")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=images, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(module, data)
    seconds = time.perf_counter() - start
    metrics = trainer.test(module, data, verbose=False)[0]
    return {"psnr": metrics["test/psnr"], "ssim": metrics["test/ssim"], "seconds": seconds,
            "gaussians": float(module.gaussians["means"].shape[0])}


def compare(name: str, data: GaussianSplattingDataModule, images: int, start: int, stop: int, every: int,
            seed: int) -> dict[str, dict[str, float]]:
    """Default first; MCMC then gets its final count as the budget, and a growth rate that reaches it.

    MCMC grows by ``growth`` per refinement step; gsplat's 5% would not reach the default run's count
    within these few steps, so the growth is the rate that does (never below 5%).
    """
    default = DensifyConfig(start_images=start, stop_images=stop, every_images=every,
                            opacity_reset_every_images=10 * images)
    results = {"default": _run(data, default, images, seed)}
    cap = int(results["default"]["gaussians"])
    data.setup("fit")
    initial = int(data.initial_points()[0].shape[0])
    steps = max(len(range(start + every - start % every, stop + 1, every)), 1)
    growth = max(0.05, (cap / initial) ** (1.0 / steps) - 1.0 + 0.01) if cap > initial else 0.05
    mcmc = MCMCConfig(cap_max=cap, start_images=start, stop_images=stop, every_images=every, growth=growth)
    results["mcmc"] = _run(data, mcmc, images, seed)
    print(f"RESULT densify.initial_gaussians_{name}={initial}")
    print(f"RESULT densify.mcmc_growth_{name}={growth:.4f}")
    for strategy, values in results.items():
        for key, value in values.items():
            print(f"RESULT densify.{strategy}_{key}_{name}={value:.4f}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps on the demo scene (smoke test)")
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
    parser.add_argument("--images", type=int, default=500, help="images seen per run")
    parser.add_argument("--width", type=int, default=80, help="image width in pixels")
    parser.add_argument("--blender-points", type=int, default=5000, help="random initial points (Blender)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if args.quick:
        data = GaussianSplattingDataModule(format="demo", image_width=32, num_init_points=200)
        compare("demo", data, images=12, start=2, stop=10, every=4, seed=args.seed)
        return
    rows = []
    for name, folder in DATASETS.items():
        path = Path(args.data_root) / folder
        if not path.is_dir():
            raise SystemExit(f"densify_strategies: dataset folder {path} not found (pass --data-root)")
        points = args.blender_points if name == "blender" else None  # COLMAP starts from its SfM points
        data = GaussianSplattingDataModule(path=str(path), format=name, image_width=args.width,  # type: ignore[arg-type]
                                           num_init_points=points)
        results = compare(name, data, args.images, start=args.images // 6, stop=3 * args.images // 4,
                          every=max(args.images // 12, 1), seed=args.seed)
        rows += [(name, strategy, values) for strategy, values in results.items()]
    print("| dataset | strategy | Gaussians | test PSNR | test SSIM | train s |")
    print("|---|---|--:|--:|--:|--:|")
    for name, strategy, v in rows:
        cells = f"{v['gaussians']:.0f} | {v['psnr']:.2f} | {v['ssim']:.4f} | {v['seconds']:.0f}"
        print(f"| {name} | {strategy} | {cells} |")


if __name__ == "__main__":
    main()

"""File size and test PSNR of a trained scene read back from each export format, on the shipped scenes.

For each scene (``blender``: ``nerf_synthetic_blocks`` with the ``gaussian/blender`` recipe's model and
data settings; ``colmap``: ``colmap_blocks`` with ``gaussian/colmap``'s) it trains ``--steps`` steps from
the recipe's seed (a short run: what is measured is each format's loss, not the best scene), writes the
Gaussians in every format with ``formats.io.write_gaussians``, reads each file back with
``read_gaussians`` and renders the test views through the module's ``render_views`` and
``metrics.psnr``, as ``lightning-grendel test`` and ``render`` do. ``.splat`` has no SH bands above 0:
its re-import gets zero bands at the trained degree. Prints, per scene, ``RESULT <scene>.gaussians``,
``<scene>.trained_psnr`` and for each format ``<scene>.<format>_bytes``, ``_psnr`` and ``_delta_db``
(re-imported minus trained; 0 for the lossless PLY).

    OMP_NUM_THREADS=2 python benchmarks/export_formats.py [--scenes blender colmap] [--steps 600] [--quick]

``--quick`` (64 px, 2 test views, 8 steps, blender only) only checks that the script runs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import lightning as L
import torch
import yaml

from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.densify import DensifyConfig
from lightning_grendel.splatting.formats.io import EXTENSIONS, FORMATS, read_gaussians, write_gaussians
from lightning_grendel.splatting.gaussians import make_parameters
from lightning_grendel.splatting.metrics import psnr
from lightning_grendel.splatting.module import GaussianSplattingModule, cameras_from_batch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
SCENES = {"blender": ("blender.yaml", "nerf_synthetic_blocks"), "colmap": ("colmap.yaml", "colmap_blocks")}


def trained_module(recipe: dict, data: GaussianSplattingDataModule, steps: int) -> GaussianSplattingModule:
    model_args = dict(recipe["model"]["init_args"])
    densify = DensifyConfig(**model_args.pop("densify"))
    L.seed_everything(recipe["seed_everything"], verbose=False)
    module = GaussianSplattingModule(**model_args, densify=densify, export_ply=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    return module.eval()


@torch.no_grad()
def view_psnr(module: GaussianSplattingModule, data: GaussianSplattingDataModule, views: int | None) -> float:
    values = []
    for index, batch in enumerate(data.test_dataloader()):
        if views is not None and index >= views:
            break
        values.append(float(psnr(module.render_views(cameras_from_batch(batch))[0], batch["image"][0])))
    return sum(values) / len(values)


def as_trained_degree(params: dict[str, torch.Tensor], bands: int) -> dict[str, torch.Tensor]:
    """Zero SH bands up to the trained count (a .splat file carries none)."""
    rest = params["shN"]
    padding = torch.zeros(rest.shape[0], bands - rest.shape[1], 3)
    return {**params, "shN": torch.cat([rest, padding], dim=1)}


def measure(scene: str, args: argparse.Namespace) -> None:
    recipe_file, dataset = SCENES[scene]
    recipe = yaml.safe_load((REPO / "recipes" / "gaussian" / recipe_file).read_text())
    data_args = {**recipe["data"]["init_args"], "path": str(Path(args.data_root) / dataset)}
    if args.quick:
        data_args["image_width"] = 64
    data = GaussianSplattingDataModule(**data_args)
    data.setup("fit")
    module = trained_module(recipe, data, args.steps)
    trained = {key: value.detach().clone() for key, value in module.gaussians.items()}
    bands = trained["shN"].shape[1]
    print(f"RESULT {scene}.gaussians={trained['means'].shape[0]}")
    baseline = view_psnr(module, data, args.views)
    print(f"RESULT {scene}.trained_psnr={baseline:.3f}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for format in FORMATS:
            path = Path(folder) / f"scene{EXTENSIONS[format]}"
            write_gaussians(path, trained, format)
            module.gaussians = make_parameters(as_trained_degree(read_gaussians(path), bands))
            value = view_psnr(module, data, args.views)
            print(f"RESULT {scene}.{format}_bytes={path.stat().st_size}")
            print(f"RESULT {scene}.{format}_psnr={value:.3f}")
            print(f"RESULT {scene}.{format}_delta_db={value - baseline:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", nargs="+", choices=sorted(SCENES), default=sorted(SCENES))
    parser.add_argument("--steps", type=int, default=600, help="training steps per scene")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"), help="the shared datasets")
    parser.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads")
    parser.add_argument("--quick", action="store_true", help="64 px, 2 test views, 8 steps, blender (a smoke run)")
    args = parser.parse_args()
    args.views = None
    if args.quick:
        args.scenes, args.steps, args.views = ["blender"], 8, 2
    if args.steps < 1 or args.threads < 1:
        parser.error("--steps and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    for scene in args.scenes:
        if not (Path(args.data_root) / SCENES[scene][1]).is_dir():
            raise SystemExit(f"{args.data_root}/{SCENES[scene][1]}: dataset not found (pass --data-root)")
        measure(scene, args)


if __name__ == "__main__":
    main()

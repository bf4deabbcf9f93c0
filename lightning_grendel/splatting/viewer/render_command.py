"""``lightning-grendel render``: test views to PNGs with PSNR/SSIM, and a camera path to a video.

The test views go through the module's own evaluation path (the test loader, ``render_views`` and the
metric functions of :mod:`~lightning_grendel.splatting.metrics`), so the numbers equal ``test``'s for
the same checkpoint. Everything is written into a temporary folder beside ``--out`` and renamed into
place at the end: a failed run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from jsonargparse import ArgumentError
from PIL import Image
from tqdm import tqdm

from lightning_grendel._atomic import as_if_created
from lightning_grendel._hparams import instantiate_from_hparams
from lightning_grendel._recipes import resolve_config
from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.gaussians import PARAM_KEYS, make_parameters
from lightning_grendel.splatting.grendel.checkpoint import META_FILE, load_sharded
from lightning_grendel.splatting.metrics import psnr, ssim
from lightning_grendel.splatting.module import GaussianSplattingModule, cameras_from_batch
from lightning_grendel.splatting.ply import load_ply
from lightning_grendel.splatting.viewer.camera_paths import ORDERS, PATH_KINDS, camera_path
from lightning_grendel.splatting.viewer.video import write_video

DATA_FLAGS = {"path": str, "format": str, "image_width": int, "downscale": float, "test_every": int}


class RenderError(ValueError):
    """Bad input to ``render``; the message names the file or flag."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-grendel render",
        description="Render a trained Gaussian scene: the test views to PNGs with per-view PSNR/SSIM "
        "(metrics.json, metrics.csv; the same numbers as `lightning-grendel test`) and a camera path "
        "(an orbit around the scene centre, or through the training cameras) to a video.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", type=Path, help="Lightning checkpoint file, or a GrendelStrategy sharded "
                        "checkpoint directory (meta.pt + shard_*.pt)")
    source.add_argument("--ply", type=Path, help="standard 3DGS PLY (needs the dataset: --data.* or --config)")
    parser.add_argument("--config", "-c", help="recipe (name or YAML path) whose data: section gives the dataset")
    for name, kind in DATA_FLAGS.items():
        parser.add_argument(f"--data.{name}", dest=f"data_{name}", type=kind, default=None,
                            help=f"GaussianSplattingDataModule {name} (default: from the checkpoint or recipe)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--path", choices=PATH_KINDS, default="orbit",
                        help="camera path of the video: orbit around the scene centre, or interpolate through "
                        "the training cameras (written as <path>.<video-format>)")
    parser.add_argument("--path-order", choices=ORDERS, default="training",
                        help="interpolate: visit the training cameras in dataset order or as a nearest-neighbour tour")
    parser.add_argument("--path-frames", type=int, default=60, help="frames of the path video (0: none)")
    parser.add_argument("--path-width", type=int, default=None, help="path video width in pixels")
    parser.add_argument("--fps", type=float, default=30.0, help="video frame rate")
    parser.add_argument("--video-format", choices=("mp4", "gif"), default="mp4", help="path video format")
    parser.add_argument("--backend", default=None, help="rasterizer backend (default: the checkpoint's, or auto)")
    parser.add_argument("--device", default="cpu", help="torch device to render on")
    return parser


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets its name in the message
        raise RenderError(f"{path}: cannot read this checkpoint (weights_only load): {error}") from error


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A single-process checkpoint, or a Grendel directory merged into one (all Gaussians, one rank)."""
    if path.is_dir():
        if not (path / META_FILE).is_file():
            raise RenderError(f"--ckpt {path}: a directory but not a GrendelStrategy checkpoint (no {META_FILE})")
        try:
            checkpoint = load_sharded(path, 0, 1)
        except (OSError, RuntimeError, ValueError, KeyError) as error:
            raise RenderError(f"--ckpt {path}: {error}") from error
    elif path.is_file():
        checkpoint = _torch_load(path)
    else:
        raise RenderError(f"--ckpt {path}: no such file or directory")
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    missing = [key for key in PARAM_KEYS if not isinstance(state, dict) or f"gaussians.{key}" not in state]
    if missing:
        raise RenderError(f"--ckpt {path}: not a GaussianSplattingModule checkpoint (no gaussians.{missing[0]} "
                          "in its state_dict)")
    return checkpoint


def _recipe_data(config: str | None) -> dict[str, Any]:
    if config is None:
        return {}
    path = Path(resolve_config(config, "--config"))
    data = (yaml.safe_load(path.read_text()) or {}).get("data", {})
    return dict(data.get("init_args", {})) if isinstance(data, dict) else {}


def make_datamodule(args: argparse.Namespace, checkpoint: dict[str, Any] | None) -> GaussianSplattingDataModule:
    """Dataset settings: the checkpoint's, then the recipe's, then explicit ``--data.*`` flags."""
    values: dict[str, Any] = dict((checkpoint or {}).get("datamodule_hyper_parameters", {}) or {})
    values.update(_recipe_data(args.config))
    values.update({k: v for k in DATA_FLAGS if (v := getattr(args, f"data_{k}")) is not None})
    if not values:
        raise RenderError("--ply needs the test cameras: give --data.path (or --config with a data: section, "
                          "or --data.format demo)")
    try:
        datamodule = instantiate_from_hparams(GaussianSplattingDataModule, values, "--data.* / --config")
        datamodule.setup("test")
    except (ArgumentError, ValueError, OSError) as error:
        raise RenderError(f"--data.path / --config: cannot load the dataset: {error}") from error
    return datamodule


def make_module(args: argparse.Namespace, checkpoint: dict[str, Any] | None) -> GaussianSplattingModule:
    """The module as ``test`` restores it: hyperparameters, Gaussians, images seen (SH degree)."""
    if checkpoint is not None:
        overrides = {} if args.backend is None else {"backend": args.backend}
        try:
            module = instantiate_from_hparams(GaussianSplattingModule, checkpoint.get("hyper_parameters", {}),
                                              f"--ckpt {args.ckpt}", **overrides)
        except (ArgumentError, ValueError) as error:
            raise RenderError(f"--ckpt {args.ckpt}: cannot rebuild the module from its hyperparameters: "
                              f"{error}") from error
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"], strict=False)
        return module
    try:
        params = load_ply(args.ply)
    except (ValueError, OSError) as error:
        raise RenderError(f"--ply {args.ply}: {error}") from error
    degree = round((params["shN"].shape[1] + 1) ** 0.5) - 1
    module = GaussianSplattingModule(sh_degree=degree, backend=args.backend or "auto")
    module.gaussians = make_parameters(params)
    module.images_seen = 1 << 62  # a PLY holds a finished model: every SH band is active
    return module


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise RenderError(f"--out {out}: already exists (pass --overwrite to replace it)")


def _staging_dir(out: Path, overwrite: bool) -> Path:
    _check_out(out, overwrite)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as error:
        raise RenderError(f"--out {out}: cannot write there: {error}") from error
    as_if_created(staging)  # mkdtemp makes it 0700; --out gets the mode mkdir would give it
    return staging


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def render_test_views(module: GaussianSplattingModule, datamodule: GaussianSplattingDataModule,
                      folder: Path) -> list[dict[str, Any]]:
    """Per-view PSNR/SSIM through the test loader and ``render_views``, exactly as ``test_step`` does."""
    folder.mkdir()
    names = datamodule.scene.test.names
    rows = []
    for batch in tqdm(datamodule.test_dataloader(), desc="test views", unit="view"):
        batch = {k: v.to(module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        render = module.render_views(cameras_from_batch(batch))[0]
        target = batch["image"][0]
        index = int(batch["index"][0])
        file = f"{index:04d}_{Path(names[index]).stem}.png"
        Image.fromarray(_to_uint8(render)).save(folder / file)
        rows.append({"index": index, "name": names[index], "file": f"test/{file}",
                     "psnr": float(psnr(render, target)), "ssim": float(ssim(render, target))})
    return rows


def run(args: argparse.Namespace) -> Path:
    """Render everything into a staging folder, then rename it to ``--out``."""
    for flag in ("path_frames", "fps"):
        if getattr(args, flag) < 0 or (flag == "fps" and args.fps == 0):
            raise RenderError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    _check_out(args.out, args.overwrite)  # before minutes of loading; checked again when the folder is made
    checkpoint = load_checkpoint(args.ckpt) if args.ckpt is not None else None
    datamodule = make_datamodule(args, checkpoint)
    module = make_module(args, checkpoint).to(args.device)
    module.background = datamodule.background.to(module.device)
    module.eval()
    staging = _staging_dir(args.out, args.overwrite)
    try:
        rows = render_test_views(module, datamodule, staging / "test")
        summary = {"source": str(args.ckpt or args.ply), "views": len(rows),
                   "psnr": float(np.mean([r["psnr"] for r in rows])) if rows else None,
                   "ssim": float(np.mean([r["ssim"] for r in rows])) if rows else None, "per_view": rows}
        (staging / "metrics.json").write_text(json.dumps(summary, indent=2))
        with open(staging / "metrics.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["index", "name", "file", "psnr", "ssim"])
            writer.writeheader()
            writer.writerows(rows)
        if args.path_frames:
            path = camera_path(args.path, datamodule.train_cameras(), args.path_frames, args.path_width,
                               args.path_order).to(module.device)
            frames = [_to_uint8(module.render_views(path[i])[0])
                      for i in tqdm(range(len(path)), desc=args.path, unit="frame")]
            write_video(staging / f"{args.path}.{args.video_format}", frames, args.fps)
        if args.out.exists():
            trash = Path(tempfile.mkdtemp(dir=staging.parent, prefix=f".{args.out.name}.old."))
            os.replace(args.out, trash / args.out.name)
            os.replace(staging, args.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, args.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return args.out


def main(argv: list[str]) -> None:
    """``lightning-grendel render ARGS``; a :class:`RenderError` reaches the command's one-line error report."""
    out = run(build_parser().parse_args(argv))
    print(f"wrote {out}")

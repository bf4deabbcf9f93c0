"""Grendel's communication and load balance, measured side by side on the shared Blender scene.

For W ranks (gloo processes) and b views per step it trains a few passes over the same cameras and
reports, per step: bytes of splats sent between ranks by the sparse all-to-all against a dense
baseline that would send every projected Gaussian to every other rank; the partition cost imbalance
(max/mean of splat-tile pairs per rank) with the balancer on and off (measured on the
second pass, once every camera has a recorded cost); and images per second (forward + backward).

    python benchmarks/grendel.py [--quick] [--data ../shared/data/nerf_synthetic_blocks]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_grendel.splatting.data.blender import load_blender_scene
from lightning_grendel.splatting.gaussians import init_from_points, make_parameters
from lightning_grendel.splatting.grendel.balancer import LoadBalancer
from lightning_grendel.splatting.grendel.redistribute import even_shares
from lightning_grendel.splatting.grendel.renderer import PAYLOAD, GrendelRenderer
from lightning_grendel.splatting.losses import strip_loss
from lightning_grendel.splatting.ply import load_ply

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nerf_synthetic_blocks"


def _rank(rank: int, world: int, init_file: str, config: dict, out: dict) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    scene = load_blender_scene(config["data"], image_width=config["width"], num_init_points=config["points"])
    if config["ply"]:
        gaussians = load_ply(config["ply"])
    else:
        gaussians = init_from_points(scene.points, scene.colors, sh_degree=1)
    sh_degree = round((gaussians["shN"].shape[1] + 1) ** 0.5) - 1
    total = gaussians["means"].shape[0]
    shares = even_shares(total, world)
    start = sum(shares[:rank])
    rows = slice(start, start + shares[rank])
    params = make_parameters({key: value[rows] for key, value in gaussians.items()})
    renderer = GrendelRenderer(LoadBalancer(config["balance"]), backend="auto")
    split = scene.train
    views = config["views"]
    batches = [list(range(i, i + config["batch"])) for i in range(0, views, config["batch"])]
    background = torch.ones(3)
    records = []
    for epoch in range(2):
        for batch in batches:
            index = torch.tensor(batch)
            cameras = split.cameras[index]
            cameras.ids = index
            targets = split.images[index, ..., :3].float() / 255.0
            dist.barrier()
            began = time.perf_counter()
            result = renderer(params, cameras, sh_degree, background, halo=5)
            pixels = cameras.width * cameras.height * 3
            loss = sum(
                strip_loss(v.image, targets[v.view, v.row_start : v.row_end], v.own_start - v.row_start,
                           v.own_end - v.row_start, pixels)
                for v in result.views
            )
            loss.backward()
            dist.barrier()
            elapsed = time.perf_counter() - began
            sent = torch.tensor([renderer.last_stats["bytes_sent"]], dtype=torch.float64)
            dist.all_reduce(sent)
            if epoch == 1:
                records.append((float(sent), renderer.last_stats["cost_imbalance_measured"], elapsed))
            for p in params.values():
                p.grad = None
    if rank == 0:
        dense = float(total * config["batch"] * (world - 1) * PAYLOAD * 4)
        out["result"] = {
            "sparse_bytes": statistics.mean(r[0] for r in records),
            "dense_bytes": dense,
            "imbalance": statistics.mean(r[1] for r in records),
            "images_per_s": config["batch"] / statistics.median(r[2] for r in records),
        }
    dist.destroy_process_group()


def _spawn(world: int, config: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        out = manager.dict()
        mp.start_processes(_rank, args=(world, os.path.join(tmp, "init"), config, out), nprocs=world,
                           start_method="spawn")
        result = dict(out["result"])
        manager.shutdown()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="W = 4, b = 1 only, smaller images (under a minute)")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--ply", default=None, help="trained Gaussians (a point_cloud.ply) instead of the random init")
    parser.add_argument("--cases", default=None, help="W x b cases to run, e.g. 4x1,4x4 (must include 4x1)")
    args = parser.parse_args()
    if not Path(args.data, "transforms_train.json").is_file():
        raise SystemExit(f"{args.data}: no NeRF-synthetic scene there (pass --data)")
    if args.quick:
        grid, width, views, points = [(4, 1)], 200, 2, 10_000
    else:
        grid, width, views, points = [(1, 1), (1, 4), (2, 1), (2, 4), (4, 1), (4, 4)], 400, 8, 50_000
    if args.cases:
        grid = [tuple(int(v) for v in case.split("x")) for case in args.cases.split(",")]
    source = args.ply or f"{points} Gaussians of the 3DGS random initialisation"
    print(f"scene {args.data} at {width}x{width}, {source}, {views} cameras x 2 passes; "
          "imbalance and bytes from the second pass")
    header = f"{'W':>2} {'b':>2} {'sparse MiB/step':>16} {'dense MiB/step':>15} {'sparse/dense':>12} " \
             f"{'imbalance on':>12} {'imbalance off':>13} {'images/s':>9}"
    print(header)
    rows = {}
    for world, batch in grid:
        base = {"data": args.data, "width": width, "points": points, "views": views, "batch": batch,
                "ply": args.ply}
        on = _spawn(world, {**base, "balance": "pairs"})
        off = _spawn(world, {**base, "balance": "off"})
        ratio = on["sparse_bytes"] / on["dense_bytes"] if on["dense_bytes"] else 0.0
        rows[(world, batch)] = (ratio, on["imbalance"], off["imbalance"])
        print(f"{world:>2} {batch:>2} {on['sparse_bytes'] / 2**20:>16.2f} {on['dense_bytes'] / 2**20:>15.2f} "
              f"{ratio:>12.3f} {on['imbalance']:>12.3f} {off['imbalance']:>13.3f} {on['images_per_s']:>9.2f}")
    ratio_w4, imbalance_w4, imbalance_w4_off = rows[(4, 1)]
    print(f"RESULT grendel.bytes_ratio_w4={ratio_w4:.4f}")
    print(f"RESULT grendel.imbalance_w4={imbalance_w4:.4f}")
    print(f"RESULT grendel.imbalance_w4_off={imbalance_w4_off:.4f}")


if __name__ == "__main__":
    main()

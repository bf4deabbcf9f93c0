"""Forward+backward time of projection + SH colour: the torch reference against the fused C++ op.

Usage: ``python benchmarks/projection.py [--quick]``. Prints the milliseconds of each and ``RESULT`` lines.

Scene: 120k Gaussians (the size of the colmap recipe's) uniform in a cube seen by one 480x360 camera,
random log-scales and quaternions, SH degree 3 (16 bands), float32, ``--threads`` threads (2, like the
recipe). The loss is a fixed random linear function of means2d, conics, depths and colours, so every
upstream gradient is non-zero, as after rasterizing. The two paths take turns; each time is the median
over ``--repeats`` runs after one warm-up. ``--quick`` uses 20k Gaussians and 3 repeats (a smoke test).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_grendel.splatting.cameras import Cameras, focal_from_fov, intrinsics_matrix, look_at_world_to_camera
from lightning_grendel.splatting.fused_projection import load_extension, project_and_shade
from lightning_grendel.splatting.projection import project_gaussians
from lightning_grendel.splatting.sh import sh_to_rgb


def make_scene(count: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], Cameras]:
    """``count`` Gaussians in [-1, 1]³ and one 480x360 camera 3 units away looking at the origin."""
    generator = torch.Generator().manual_seed(seed)
    gaussians = {
        "means": torch.rand(count, 3, generator=generator) * 2 - 1,
        "scales": (torch.rand(count, 3, generator=generator) * 2 - 5.5).exp(),
        "quats": torch.randn(count, 4, generator=generator),
        "coefficients": torch.randn(count, 16, 3, generator=generator) * 0.2,
    }
    eye = torch.tensor([3.0, 0.5, 1.0])
    width, height = 480, 360
    focal = focal_from_fov(0.9, width)
    intrinsics = intrinsics_matrix(focal, focal, width / 2, height / 2)
    camera = Cameras(look_at_world_to_camera(eye, torch.zeros(3)), intrinsics, width, height)
    return gaussians, camera


def torch_path(g: dict[str, torch.Tensor], cameras: Cameras):
    projected = project_gaussians(g["means"], g["quats"], g["scales"], cameras)
    directions = g["means"][None] - cameras.centers[:, None]
    return projected, sh_to_rgb(3, g["coefficients"][None], directions)


def fused_path(g: dict[str, torch.Tensor], cameras: Cameras):
    return project_and_shade(g["means"], g["quats"], g["scales"], g["coefficients"], cameras, 3)


def step_seconds(path, gaussians: dict[str, torch.Tensor], cameras: Cameras, weights: list[torch.Tensor]) -> float:
    """Seconds of one forward + backward of ``path``."""
    leaves = {k: v.clone().requires_grad_() for k, v in gaussians.items()}
    start = time.perf_counter()
    projected, colors = path(leaves, cameras)
    outputs = (projected.means2d, projected.conics, projected.depths, colors)
    sum((out * w).sum() for out, w in zip(outputs, weights, strict=True)).backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20k Gaussians, 3 repeats (smoke test)")
    parser.add_argument("--gaussians", type=int, default=120_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    count, repeats = (20_000, 3) if args.quick else (args.gaussians, args.repeats)
    if load_extension() is None:
        raise SystemExit("the C++ projection extension could not be built (see the warning above)")
    torch.set_num_threads(args.threads)
    gaussians, cameras = make_scene(count)
    generator = torch.Generator().manual_seed(1)
    weights = [torch.randn(shape, generator=generator) for shape in ((1, count, 2), (1, count, 3), (1, count),
                                                                       (1, count, 3))]
    times: dict[str, list[float]] = {"torch": [], "cpp": []}
    paths = {"torch": torch_path, "cpp": fused_path}
    for repeat in range(repeats + 1):
        for name, path in paths.items():
            seconds = step_seconds(path, gaussians, cameras, weights)
            if repeat > 0:  # the first round warms up
                times[name].append(seconds)
    torch_ms, cpp_ms = (1000 * statistics.median(times[name]) for name in ("torch", "cpp"))
    print(f"{count} Gaussians, SH degree 3, one 480x360 camera, {args.threads} threads, forward+backward")
    print(f"{'path':8s} {'ms':>9s}")
    print(f"{'torch':8s} {torch_ms:9.1f}")
    print(f"{'cpp':8s} {cpp_ms:9.1f}")
    print(f"RESULT projection.torch_ms={torch_ms:.1f}")
    print(f"RESULT projection.cpp_ms={cpp_ms:.1f}")
    print(f"RESULT projection.speedup={torch_ms / cpp_ms:.2f}")


if __name__ == "__main__":
    main()

"""Forward+backward time per image: the project's full render path against a direct ``gsplat.rasterization``.

Usage: ``python benchmarks/gpu_render.py`` on a CUDA machine with gsplat (1M Gaussians, 1920x1080, SH
degree 3), or ``python benchmarks/gpu_render.py --device cpu --quick`` anywhere (a smoke run of this script:
tiny sizes, the torch backend, no gsplat and no ratio).

Both sides start from the same raw parameters (means, log-scales, wxyz quaternions, opacity logits, SH
coefficients) and the same camera, and both pay the activations, the projection, the SH colours and the
rasterization, forward and backward, with the gradient reaching every raw parameter:

* ours: ``SingleProcessRenderer(backend)`` (projection + SH by ``projection="auto"``, which on CUDA with
  gsplat is gsplat's fused kernels, then ``rasterize(backend=...)``);
* ours with ``projection="torch"``: the same with the torch reference projection + SH (many small kernels);
* gsplat: ``gsplat.rasterization(...)`` with its defaults (fused CUDA projection and SH, packed mode).

Scene: Gaussians uniform in a cube in front of the camera, opacities sigmoid(N(0, 2)), anisotropic scales
of about 0.5 to 6 pixels standard deviation (as in ``benchmarks/rasterizer.py``). Time is the median of
``--repeats`` CUDA-event timings after ``--warmup`` untimed runs (wall clock on CPU); peak memory is
``torch.cuda.max_memory_allocated`` over the timed runs, and also that minus what was allocated before
them (the inputs). The two images are compared too (mean absolute difference), so that a camera
convention mismatch cannot pass for a speed-up. Prints a table and ``RESULT`` lines.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_grendel.splatting.cameras import Cameras, focal_from_fov, intrinsics_matrix, look_at_world_to_camera
from lightning_grendel.splatting.render import SingleProcessRenderer

CAMERA_DISTANCE = 4.5
FOV = 0.8  # horizontal, radians
FULL = {"gaussians": 1_000_000, "width": 1920, "height": 1080, "sh_degree": 3, "warmup": 3, "repeats": 10}
QUICK = {"gaussians": 300, "width": 48, "height": 32, "sh_degree": 3, "warmup": 0, "repeats": 2}
RAW_KEYS = ("means", "scales", "quats", "opacities", "sh0", "shN")


def make_camera(width: int, height: int) -> Cameras:
    """One pinhole camera on the +x side of the cube, slightly above it, looking at its centre."""
    w2c = look_at_world_to_camera(torch.tensor([CAMERA_DISTANCE, 0.4, 0.9]), torch.zeros(3))
    focal = focal_from_fov(FOV, width)
    return Cameras(w2c[None], intrinsics_matrix(focal, focal, width / 2, height / 2)[None], width, height)


def make_gaussians(count: int, sh_degree: int, pixels_per_unit: float, seed: int = 0) -> dict[str, Tensor]:
    """Raw (pre-activation) parameters of ``count`` random Gaussians a few pixels wide."""
    g = torch.Generator().manual_seed(seed)
    log_sigma_px = math.log(0.5) + torch.rand(count, 1, generator=g) * math.log(12.0)
    anisotropy = torch.rand(count, 3, generator=g) * math.log(3.0) - math.log(3.0) / 2
    bases = (sh_degree + 1) ** 2
    return {
        "means": torch.rand(count, 3, generator=g) * 2 - 1,
        "scales": log_sigma_px + anisotropy - math.log(pixels_per_unit),
        "quats": torch.randn(count, 4, generator=g),
        "opacities": torch.randn(count, generator=g) * 2,
        "sh0": torch.randn(count, 1, 3, generator=g) * 0.5,
        "shN": torch.randn(count, bases - 1, 3, generator=g) * 0.1,
    }


def render_ours(backend: str, projection: str = "auto") -> Callable[[dict[str, Tensor], Cameras, int], Tensor]:
    """The project's path: projection + SH + ``rasterize(backend=...)``; returns the [H, W, 3] image."""
    renderer = SingleProcessRenderer(backend, projection=projection)

    def render(params: dict[str, Tensor], camera: Cameras, sh_degree: int) -> Tensor:
        background = torch.zeros(3, device=params["means"].device)
        return renderer(params, camera, sh_degree, background).views[0].image

    return render


def render_gsplat(params: dict[str, Tensor], camera: Cameras, sh_degree: int) -> Tensor:
    """A direct ``gsplat.rasterization`` call with its defaults; returns the [H, W, 3] image."""
    import gsplat

    colors, _, _ = gsplat.rasterization(
        params["means"], params["quats"], params["scales"].exp(), torch.sigmoid(params["opacities"]),
        torch.cat([params["sh0"], params["shN"]], dim=1), camera.world_to_camera, camera.intrinsics,
        camera.width, camera.height, sh_degree=sh_degree,
    )
    return colors[0]


def time_render(render: Callable, raw: dict[str, Tensor], camera: Cameras, sh_degree: int, warmup: int,
                repeats: int) -> tuple[float, float, float, Tensor]:
    """(median ms, peak MiB, peak MiB above the inputs, image) of forward+backward; MiB are NaN on CPU."""
    device = raw["means"].device
    params = {key: value.clone().requires_grad_(True) for key, value in raw.items()}
    weights = torch.rand(camera.height, camera.width, 3, generator=torch.Generator().manual_seed(1)).to(device)
    cuda = device.type == "cuda"

    def step() -> Tensor:
        for param in params.values():
            param.grad = None
        image = render(params, camera, sh_degree)
        (image * weights).sum().backward()
        return image

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            image = step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            image = step()
            times.append((time.perf_counter() - began) * 1e3)
    missing = [key for key, param in params.items() if param.grad is None]
    if missing:
        raise RuntimeError(f"no gradient reached {missing}: the comparison would not be like for like")
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        above = peak - baseline / 2**20
    else:
        peak = above = float("nan")
    return statistics.median(times), peak, above, image.detach()


def gsplat_usable(device: torch.device) -> tuple[bool, str]:
    """Whether the direct gsplat comparison can run here, and why not."""
    if device.type != "cuda":
        return False, f"device is {device.type}, and gsplat needs CUDA"
    if importlib.util.find_spec("gsplat") is None:
        return False, "gsplat is not installed (pip install 'lightning-grendel[cuda]')"
    return True, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run of the script)")
    parser.add_argument("--backend", default=None, help="our rasterizer backend (default: gsplat on CUDA, else torch)")
    for name, value in FULL.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {value}")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --quick for a smoke run)")
    sizes = dict(QUICK if args.quick else FULL)
    sizes.update({name: getattr(args, name) for name in FULL if getattr(args, name) is not None})
    backend = args.backend or ("gsplat" if device.type == "cuda" else "torch")

    camera = make_camera(sizes["width"], sizes["height"])
    pixels_per_unit = float(camera.intrinsics[0, 0, 0]) / CAMERA_DISTANCE
    raw = {k: v.to(device) for k, v in make_gaussians(sizes["gaussians"], sizes["sh_degree"], pixels_per_unit).items()}
    camera = Cameras(camera.world_to_camera.to(device), camera.intrinsics.to(device), camera.width, camera.height)
    print(f"{sizes['gaussians']:,} Gaussians, {camera.width}x{camera.height}, SH degree {sizes['sh_degree']}, "
          f"{device}, median of {sizes['repeats']} after {sizes['warmup']} warm-up runs")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")

    ours, ours_torch = f"ours ({backend})", f"ours ({backend}, torch projection)"
    runs = {ours: render_ours(backend), ours_torch: render_ours(backend, "torch")}
    usable, why_not = gsplat_usable(device)
    if usable:
        runs["gsplat.rasterization"] = render_gsplat
    results = {name: time_render(fn, raw, camera, sizes["sh_degree"], sizes["warmup"], sizes["repeats"])
               for name, fn in runs.items()}

    print("| path | ms / image (fwd+bwd) | peak MiB | peak MiB above inputs |\n|---|---|---|---|")
    for name, (ms, peak, above, _) in results.items():
        print(f"| {name} | {ms:.2f} | {peak:.0f} | {above:.0f} |")
    ours_ms, ours_peak = results[ours][:2]
    ours_torch_ms = results[ours_torch][0]
    print(f"RESULT gpu.ms_ours={ours_ms:.3f}")
    print(f"RESULT gpu.ms_ours_torch_projection={ours_torch_ms:.3f}")
    if not usable:
        print(f"gsplat comparison skipped: {why_not}")
        return
    gsplat_ms, gsplat_peak, _, gsplat_image = results["gsplat.rasterization"]
    difference = max((results[name][3] - gsplat_image).abs().mean().item() for name in (ours, ours_torch))
    print(f"RESULT gpu.ms_gsplat={gsplat_ms:.3f}")
    print(f"RESULT gpu.render_ratio_vs_gsplat={ours_ms / gsplat_ms:.3f}")
    print(f"RESULT gpu.render_ratio_vs_gsplat_torch_projection={ours_torch_ms / gsplat_ms:.3f}")
    print(f"RESULT gpu.peak_mib_ours={ours_peak:.0f}")
    print(f"RESULT gpu.peak_mib_gsplat={gsplat_peak:.0f}")
    print(f"RESULT gpu.image_mean_abs_diff={difference:.2e}")
    if not difference < 1e-2:
        raise SystemExit(f"the two paths render different images (mean |diff| {difference:.3g}): check the setup")


if __name__ == "__main__":
    main()

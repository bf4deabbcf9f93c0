"""Forward+backward time per image of the torch rasterizer and both C++ kernels on realistic random scenes.

Usage: ``python benchmarks/rasterizer.py [--quick]``. Prints a table and ``RESULT`` lines.

Scenes: Gaussians uniform in a cube seen whole by one camera, opacities sigmoid(N(0, 2)), anisotropic
scales with per-axis standard deviations of about 0.3 to 10 pixels (3-sigma radii: 10% under 4 px,
median 7 px, 10% over 18 px), like a trained 3DGS scene; the same pixel sizes at every resolution.

Each configuration runs in a fresh process that loads the scene from a file; peak memory is the growth
of that process's maximum resident set size (``ru_maxrss``) while rasterizing, i.e. what rendering
adds on top of the inputs. The simd / scalar ratio (``RESULT rasterizer.simd_vs_scalar_100k_400``) comes
from one more process that alternates the two kernels at 2 threads (median of each), since separate
processes can catch a drifting host in different phases; the ratio of the separate processes' times is
printed too (``simd_vs_scalar_separate_100k_400``).
Speedups compare against the torch backend with 2 threads, timed once;
cpp is timed after two warm-up runs (median of 7, 3 with ``--quick``): training calls the kernels thousands
of times, so the steady state is what a step costs, and a median of several runs damps a noisy host.
``--quick`` (about a minute) keeps only 100k / 400x400 and estimates the torch time from every 5th tile
row, one call per strip, so the estimate also pays torch's binning of all splats five times and overstates
its time somewhat. Blended pairs are the (Gaussian, pixel) pairs the forward actually composites. ``cpp-scalar`` is the
scalar kernel (``csrc/rasterize.cpp``, the fallback and reference), ``cpp-simd`` the vectorised one that
``backend="cpp"`` runs on float32. The ceiling is a minimal vectorised exp + blend loop (the simd
kernel's own ``fast_exp``, no binning, no memory traffic, no backward) timed on the same machine.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import queue as queue_module
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lightning_grendel.splatting.cameras import Cameras, focal_from_fov, intrinsics_matrix, look_at_world_to_camera
from lightning_grendel.splatting.projection import project_gaussians
from lightning_grendel.splatting.rasterize import rasterize
from lightning_grendel.splatting.rasterize.cpp_backend import load_extension, prepare_inputs, rasterize_cpp
from lightning_grendel.splatting.rasterize.splats import PixelRows, Splats

# As the Makefile runs everything; the measuring child processes read it when their OpenMP starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

CAMERA_DISTANCE = 4.0
FOV = 0.8
FULL_SIZES = [(10_000, 200), (100_000, 400), (500_000, 800)]
QUICK_SIZES = [(100_000, 400)]
QUICK_TORCH_STRIPS = 5
CEILING_PAIRS_PER_THREAD = 400_000_000
KERNELS = {"cpp-scalar": "scalar", "cpp-simd": "simd"}  # benchmark label -> rasterize_cpp(impl=...)
CPP_WARMUP_RUNS = 2  # the first calls fault in the kernels' scratch memory
TORCH_MAX_GAUSSIANS = 100_000  # torch's autograd memory grows with splat-tile pairs: ~7 GiB at 100k / 400x400


def camera(size: int) -> Cameras:
    """A camera on the +x axis, slightly above the cube, looking at its centre."""
    w2c = look_at_world_to_camera(torch.tensor([CAMERA_DISTANCE, 0.3, 0.8]), torch.zeros(3))
    focal = focal_from_fov(FOV, size)
    return Cameras(w2c[None], intrinsics_matrix(focal, focal, size / 2, size / 2)[None], size, size)


def scene(count: int, size: int, seed: int = 0) -> dict:
    """Projected splats of ``count`` Gaussians for one ``size`` x ``size`` view."""
    g = torch.Generator().manual_seed(seed)
    cam = camera(size)
    pixels_per_unit = float(cam.intrinsics[0, 0, 0]) / CAMERA_DISTANCE
    log_sigma_px = math.log(0.5) + torch.rand(count, 1, generator=g) * math.log(12.0)
    anisotropy = torch.rand(count, 3, generator=g) * math.log(3.0)
    scales = (log_sigma_px + anisotropy - math.log(3.0) / 2).exp() / pixels_per_unit
    means = torch.rand(count, 3, generator=g) * 2 - 1
    quats = torch.randn(count, 4, generator=g)
    proj = project_gaussians(means, quats, scales, cam)
    return {
        "means2d": proj.means2d[0],
        "conics": proj.conics[0],
        "colors": torch.rand(count, 3, generator=g),
        "opacities": torch.sigmoid(torch.randn(count, generator=g) * 2),
        "depths": proj.depths[0],
        "radii": proj.radii[0],
    }


def blended_pairs(splats: dict, size: int) -> int:
    """Gaussian-pixel pairs the simd forward actually blends (alpha >= 1/255, before termination)."""
    inputs = prepare_inputs(Splats(**splats), torch.zeros(3))
    means2d, conics, colors, opacities, depths, background, radii = inputs
    out = load_extension().forward_simd(means2d, conics, colors, opacities, depths, radii, size, size, background, 0,
                                        size)
    return int(out[-1])


def render(params: dict, size: int, backend: str, row_start: int, row_end: int) -> torch.Tensor:
    """One strip through ``rasterize`` (torch) or straight through one C++ kernel."""
    if backend in KERNELS:
        rows = PixelRows(size, size, row_start, row_end, torch.zeros(3))
        return rasterize_cpp(Splats(**params), rows, impl=KERNELS[backend])
    return rasterize(**params, width=size, height=size, row_start=row_start, row_end=row_end, backend=backend)


def time_backend(splats: dict, size: int, backend: str, repeats: int, strips: int = 1) -> float:
    """Median seconds of one forward+backward; the cpp backend gets untimed warm-up runs first.

    With ``strips`` > 1 only the middle tile row of every ``strips`` 16-pixel tile rows is rendered (one
    call per row) and the sum is scaled by ``strips``: an estimate for a backend too slow to time on the whole image.
    """
    params = trainable(splats)
    warmup = CPP_WARMUP_RUNS if backend in KERNELS else 0  # the torch backend takes minutes and has nothing to warm up
    times = [time_once(params, size, backend, strips) for _ in range(repeats + warmup)]
    return statistics.median(times[warmup:])


def trainable(splats: dict) -> dict:
    """A copy of the splats whose rasterizer inputs require grad."""
    return {k: v.clone().requires_grad_(k in ("means2d", "conics", "colors", "opacities")) for k, v in splats.items()}


def time_once(params: dict, size: int, backend: str, strips: int = 1) -> float:
    """Seconds of one forward+backward (of every ``strips``-th tile row, scaled up, when ``strips`` > 1)."""
    first = 16 * (strips // 2)  # the middle tile row of each group of ``strips``
    ranges = [(row, min(row + 16, size)) for row in range(first, size, 16 * strips)] if strips > 1 else [(0, size)]
    start = time.perf_counter()
    for row_start, row_end in ranges:
        image = render(params, size, backend, row_start, row_end)
        if image.requires_grad:  # a strip that no splat touches is plain background
            image.sum().backward()
    return (time.perf_counter() - start) * strips


def measure_paired(scene_file: str, size: int, threads: int, rounds: int, queue) -> None:
    """Child process: the two C++ kernels timed in alternation, so that both see the same host.

    On a shared machine whose speed drifts over seconds, two separate processes can catch different
    phases of it; alternating scalar and simd calls in one process cancels that drift out of their ratio.
    Reports the median seconds of each kernel (after warm-up runs).
    """
    torch.set_num_threads(threads)
    params = trainable(torch.load(scene_file, weights_only=True))
    load_extension()
    times = {backend: [] for backend in KERNELS}
    for round_index in range(rounds + CPP_WARMUP_RUNS):
        for backend in KERNELS:
            seconds = time_once(params, size, backend)
            if round_index >= CPP_WARMUP_RUNS:
                times[backend].append(seconds)
    queue.put(tuple(statistics.median(times[backend]) for backend in KERNELS))


def measure(scene_file: str, size: int, backend: str, threads: int, repeats: int, strips: int, queue) -> None:
    """Child process: time one configuration and report (seconds, peak RSS growth in MiB)."""
    torch.set_num_threads(threads)
    splats = torch.load(scene_file, weights_only=True)
    load_extension()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = time_backend(splats, size, backend, repeats, strips)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((seconds, (after - before) / 1024))


def run_isolated(scene_file: str, size: int, backend: str, threads: int, repeats: int, strips: int = 1):
    """(seconds, peak MiB) of one configuration, measured in a fresh process."""
    return run_child(measure, scene_file, size, backend, threads, repeats, strips)


def run_child(target, *args):
    """What ``target(*args, queue)`` puts on its queue, run in a fresh spawned process."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=target, args=(*args, queue))
    process.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not process.is_alive():
                raise RuntimeError(f"benchmark child {target.__name__}{args} exited {process.exitcode}") from None
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k / 400x400 only, torch estimated from strips")
    args = parser.parse_args()
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    repeats = 3 if args.quick else 7
    if load_extension() is None:
        raise SystemExit("the C++ rasterizer did not build; see the warning above")

    header = (
        f"{'gaussians':>9} {'image':>7} {'backend':>8} {'threads':>7} {'fwd+bwd s':>10} {'peak MiB':>9} {'speedup':>8}"
    )
    print(header)
    print("-" * len(header))
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        for count, size in sizes:
            splats = scene(count, size)
            scene_file = str(Path(tmp) / f"scene_{count}_{size}.pt")
            torch.save(splats, scene_file)
            rows = []
            torch_time = None
            if count <= TORCH_MAX_GAUSSIANS:
                strips = QUICK_TORCH_STRIPS if args.quick else 1
                torch_time, torch_mem = run_isolated(scene_file, size, "torch", 2, 1, strips)
                label = "torch" if strips == 1 else "torch*"
                rows.append((label, 2, torch_time, torch_mem))
            for backend in KERNELS:
                for threads in (1, 2):
                    seconds, mem = run_isolated(scene_file, size, backend, threads, repeats)
                    rows.append((backend, threads, seconds, mem))
            for backend, threads, seconds, mem in rows:
                speedup = f"{torch_time / seconds:8.1f}" if torch_time else "       -"
                image = f"{size}x{size}"
                print(f"{count:>9} {image:>7} {backend:>8} {threads:>7} {seconds:>10.3f} {mem:>9.0f} {speedup}")
            if torch_time is None:
                print(f"{count:>9} {f'{size}x{size}':>7} {'torch':>8}   skipped: memory grows with splat-tile pairs")
            pairs = blended_pairs(splats, size)
            times = {(backend, threads): seconds for backend, threads, seconds, _ in rows}
            simd_time, scalar_time = times[("cpp-simd", 2)], times[("cpp-scalar", 2)]
            paired_scalar, paired_simd = run_child(measure_paired, scene_file, size, 2, repeats)
            print(f"{'':>17} blended pairs {pairs:,}: {pairs / simd_time:,.0f} pairs/s (cpp-simd, 2 threads, fwd+bwd); "
                  f"simd / scalar {scalar_time / simd_time:.2f}x in separate processes, "
                  f"{paired_scalar / paired_simd:.2f}x alternating in one ({paired_scalar:.3f} / {paired_simd:.3f} s)")
            summary[(count, size)] = (torch_time, simd_time, scalar_time, pairs, paired_scalar / paired_simd)
    if args.quick:
        print(f"torch* = estimated from every {QUICK_TORCH_STRIPS}th tile row (--quick)")

    ext = load_extension()
    torch.set_num_threads(2)
    ceiling = ext.exp_blend_ceiling(CEILING_PAIRS_PER_THREAD, 2)
    torch_time, simd_time, scalar_time, pairs, paired_ratio = summary[(100_000, 400)]
    print(f"simd ISA {ext.simd_isa()}; ceiling (exp + blend loop, 2 threads, forward only) {ceiling:.3g} pairs/s")
    print(f"RESULT rasterizer.speedup_100k_400={torch_time / simd_time:.1f}")
    print(f"RESULT rasterizer.scalar_speedup_100k_400={torch_time / scalar_time:.1f}")
    print(f"RESULT rasterizer.simd_vs_scalar_100k_400={paired_ratio:.2f}")
    print(f"RESULT rasterizer.simd_vs_scalar_separate_100k_400={scalar_time / simd_time:.2f}")
    print(f"RESULT rasterizer.pairs_per_s={pairs / simd_time:.3g}")
    print(f"RESULT rasterizer.exp_blend_ceiling_pairs_per_s={ceiling:.3g}")
    print(f"RESULT rasterizer.ceiling_fraction={pairs / simd_time / ceiling:.3f}")


if __name__ == "__main__":
    main()

"""Cost curves of the cpp 3DGS training step: CPU time per stage against the Gaussian count and the resolution.

Usage: ``python benchmarks/cost_curves.py [--quick] [--plot docs/results/cost_curves.png]``.

The step is ``GaussianSplattingModule``'s on one view with ``backend="cpp"`` (what ``make demo`` and the
recipes run on a CPU), SH degree 3 active, the module's fused Adam, its finite guard and densification
statistics, called function by function as ``training_step`` calls them (Lightning's own per-step work is
left out). Gaussians are N noisy points on the surfaces the demo scene's 4 orbit cameras see (as an SfM
cloud: a denser cloud has smaller Gaussians), initialised as training initialises them; the view is the
first of those cameras. Two sweeps: N at one resolution (``--height``), and the resolution at one N
(``--count``), the same poses and field of view at every resolution.

Stages: ``projection`` (fused projection + SH colour, forward), ``binning`` (tile boxes, depth sort, tile
lists: the extension's ``bin_simd``, the simd forward's own first half, timed in an extra call),
``compositing`` (the rasterizer's forward minus that binning), ``loss`` (fused L1 + D-SSIM and its gradient
w.r.t. the image), ``raster_backward`` (the rasterizer's backward), ``projection_backward`` (the
projection's and the activations'; with the rasterizer's it makes the ``backward`` group, also fitted as
one stage), ``adam`` (the optimiser step), ``guard`` (the finite guard, ``on_nonfinite``, on the gradients
before the step and on the parameters after it), ``other`` (zeroing and dividing the gradients, the
densification statistics). Each is timed with ``time.thread_time()`` (CPU time of this thread; torch and
the kernels run on it alone with ``--threads 1``, the default), which a busy machine disturbs far less than
wall time. Each point's stages are medians over ``--steps`` instrumented steps; they alternate with as many
plain steps (the same calls, one ``backward()``, no extra binning) whose median is the ``step`` column, so
the stages' sum against it checks the split. Untimed warm-up steps first.

Prints a table per sweep, least-squares exponents of log time against log N and log pixels over the upper
half of each range (``RESULT cost_curves.exponent_gaussians_<stage>`` and ``..._pixels_<stage>``,
``total`` for the step), which stage dominates where, and the crossovers between them.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# As the Makefile runs everything; read when torch starts its OpenMP pool (--threads sets the thread count).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402 - after the OpenMP settings

from lightning_grendel import GaussianSplattingModule  # noqa: E402
from lightning_grendel.splatting.data.demo_scene import orbit_cameras, render_views, surface_points  # noqa: E402
from lightning_grendel.splatting.gaussians import init_from_points, make_parameters  # noqa: E402
from lightning_grendel.splatting.losses import strip_loss  # noqa: E402
from lightning_grendel.splatting.rasterize import rasterize  # noqa: E402
from lightning_grendel.splatting.rasterize.cpp_backend import load_extension, prepare_inputs  # noqa: E402
from lightning_grendel.splatting.render import splat_gaussians  # noqa: E402

STAGES = ("projection", "binning", "compositing", "loss", "raster_backward", "projection_backward", "adam", "guard",
          "other")
GROUPS = {"backward": ("raster_backward", "projection_backward")}  # fitted as one stage too
TRAINED = ("means2d", "conics", "colors", "opacities")  # the splat tensors the rasterizer differentiates
ORBIT_VIEWS = 4
SSIM_WEIGHT = 0.2  # the module's default
VIEWS_PER_STEP = 1
GAUSSIANS = [10_000, 30_000, 100_000, 300_000, 1_000_000, 4_000_000]
HEIGHTS = [240, 360, 480, 720, 1080]
QUICK_GAUSSIANS = [2_000, 8_000]
QUICK_HEIGHTS = [36, 72]


def frame(height: int) -> tuple[int, int]:
    """(width, height) of a 16:9 frame ``height`` pixels high, width even (480p is 854 x 480)."""
    return 2 * round(height * 8 / 9), height


@dataclass
class Point:
    """One measured configuration: median CPU and wall milliseconds per stage, and of the plain step."""

    count: int
    width: int
    height: int
    cpu: dict[str, float]
    wall: dict[str, float]
    step_cpu: float
    step_wall: float

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def stage_sum(self) -> float:
        return sum(self.cpu.values())

    def dominant(self) -> str:
        return max(STAGES, key=lambda stage: self.cpu[stage])


@dataclass
class Laps:
    """CPU and wall time since the previous lap, added to a stage; records nothing when not ``split``."""

    split: bool
    cpu: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    wall: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    last: tuple[float, float] = field(default_factory=lambda: (time.thread_time(), time.perf_counter()))

    def __call__(self, stage: str) -> None:
        if not self.split:
            return
        now = (time.thread_time(), time.perf_counter())
        self.cpu[stage] += now[0] - self.last[0]
        self.wall[stage] += now[1] - self.last[1]
        self.last = (time.thread_time(), time.perf_counter())


class StepRunner:
    """The module's Gaussians, optimiser, guard and densifier on one view; runs its training step."""

    def __init__(self, points: torch.Tensor, colors: torch.Tensor, view: torch.Tensor, cameras) -> None:
        self.module = GaussianSplattingModule(sh_degree=3, sh_degree_interval=0, backend="cpp", export_ply=False)
        self.module.gaussians = make_parameters(init_from_points(points, colors, sh_degree=3))
        self.optimizer = self.module.configure_optimizers()
        self.camera, self.target = cameras, view
        self.steps = 0

    def step(self, split: bool) -> Laps:
        """One training step; with ``split``, its stages timed apart (binning in an extra call)."""
        module, optimizer, params = self.module, self.optimizer, self.module.gaussians
        height, width = self.target.shape[:2]
        laps = Laps(split)
        optimizer.zero_grad(set_to_none=True)
        laps("other")
        splats = splat_gaussians(params, self.camera, module.active_sh_degree, module.renderer.rasterize_mode)
        splats.means2d.retain_grad()
        one = splats.camera(0)
        # Split: the rasterizer runs on detached copies, so its backward and the projection's are timed apart.
        leaves = one.replace(**{key: getattr(one, key).detach().requires_grad_(True) for key in TRAINED}) \
            if split else one
        laps("projection")
        if split:
            load_extension().bin_simd(*bin_arguments(one, module.background), width, height, module.background, 0,
                                      height)
            laps("binning")
        image = rasterize(*leaves.tensors(), width, height, module.background, backend="cpp")
        laps("compositing")  # the whole forward here; its binning is subtracted below
        full_pixels = width * height * 3
        if split:
            leaf = image.detach().requires_grad_(True)
            loss = strip_loss(leaf, self.target, 0, height, full_pixels, SSIM_WEIGHT)
            loss.backward()
            laps("loss")
            image.backward(leaf.grad)
            laps("raster_backward")
            torch.autograd.backward([getattr(one, key) for key in TRAINED],
                                    [getattr(leaves, key).grad for key in TRAINED])
            laps("projection_backward")
        else:
            loss = strip_loss(image, self.target, 0, height, full_pixels, SSIM_WEIGHT)
            loss.backward()
        self.steps += 1
        for param in params.values():
            param.grad /= VIEWS_PER_STEP
        laps("other")
        if not module.guard.before_step(loss, params, optimizer, self.steps, self.steps):
            raise RuntimeError("the finite guard skipped a benchmark step")
        laps("guard")
        module.densifier.accumulate(splats.means2d.grad, splats.radii, width, height)
        laps("other")
        optimizer.step()
        laps("adam")
        module.guard.after_step(params, optimizer, self.steps, self.steps)
        laps("guard")
        for times in (laps.cpu, laps.wall):
            times["compositing"] -= times["binning"]
        return laps


def bin_arguments(splats, background: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The simd kernel's splat arguments (means2d, conics, colors, opacities, depths, radii), as the forward's."""
    means2d, conics, colors, opacities, depths, _, radii = prepare_inputs(splats, background)
    return means2d, conics, colors, opacities, depths, radii


def measure(runner: StepRunner, steps: int, warmup: int, count: int) -> Point:
    """Medians of ``steps`` instrumented steps (per stage) and ``steps`` plain ones (the step), alternating."""
    for _ in range(warmup):
        runner.step(split=True)
        runner.step(split=False)
    split_laps, plain_cpu, plain_wall = [], [], []
    for _ in range(steps):
        split_laps.append(runner.step(split=True))
        start = (time.thread_time(), time.perf_counter())
        runner.step(split=False)
        plain_cpu.append(time.thread_time() - start[0])
        plain_wall.append(time.perf_counter() - start[1])

    def median_ms(values: list[float]) -> float:
        return 1000 * statistics.median(values)

    height, width = runner.target.shape[:2]
    return Point(count, width, height,
                 {stage: median_ms([laps.cpu[stage] for laps in split_laps]) for stage in STAGES},
                 {stage: median_ms([laps.wall[stage] for laps in split_laps]) for stage in STAGES},
                 median_ms(plain_cpu), median_ms(plain_wall))


def scene(count: int, height: int, target_heights: list[int]):
    """N surface points seen from the orbit cameras at ``height``, and per target height the first view's camera and
    its demo-scene image (float in [0, 1])."""
    width = frame(height)[0]
    points, colors = surface_points(orbit_cameras(ORBIT_VIEWS, width, height, torch.Generator().manual_seed(0)), count,
                                    torch.Generator().manual_seed(1))
    views = {}
    for target_height in target_heights:
        cameras = orbit_cameras(ORBIT_VIEWS, *frame(target_height), torch.Generator().manual_seed(0))[0:1]
        views[target_height] = (cameras, render_views(cameras, supersample=1)[0].to(torch.float32) / 255.0)
    return points, colors, views


def sweep_gaussians(counts: list[int], height: int, steps: Callable[[int], int], warmup: int) -> list[Point]:
    results = []
    for count in counts:
        points, colors, views = scene(count, height, [height])
        cameras, image = views[height]
        results.append(report(measure(StepRunner(points, colors, image, cameras), steps(count), warmup, count)))
    return results


def sweep_pixels(count: int, heights: list[int], steps: int, warmup: int, fit_height: int) -> list[Point]:
    points, colors, views = scene(count, fit_height, heights)
    results = []
    for height in heights:
        cameras, image = views[height]
        results.append(report(measure(StepRunner(points, colors, image, cameras), steps, warmup, count)))
    return results


HEADER = ("| Gaussians | image | " + " | ".join(STAGES) + " | stages sum | step (CPU) | step (wall) | sum / step |"
          " dominant |")


def report(point: Point) -> Point:
    """Prints the point's table row (CPU milliseconds) as soon as it is measured."""
    cells = " | ".join(f"{point.cpu[stage]:.1f}" for stage in STAGES)
    print(f"| {point.count:,} | {point.width}x{point.height} | {cells} | {point.stage_sum:.1f} | "
          f"{point.step_cpu:.1f} | {point.step_wall:.1f} | {point.stage_sum / point.step_cpu:.2f} | "
          f"{point.dominant()} |", flush=True)
    return point


def exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def upper_half(points: list[Point]) -> list[Point]:
    """The points a fit uses: the upper half of the range, its middle point included."""
    return points[(len(points) - 1) // 2:]


def exponents(points: list[Point], x: Callable[[Point], float]) -> dict[str, float]:
    fitted = upper_half(points)
    xs = [x(p) for p in fitted]
    values = {stage: exponent(xs, [p.cpu[stage] for p in fitted]) for stage in STAGES}
    for group, parts in GROUPS.items():
        values[group] = exponent(xs, [sum(p.cpu[part] for part in parts) for p in fitted])
    values["total"] = exponent(xs, [p.step_cpu for p in fitted])
    return values


def crossovers(points: list[Point], x: Callable[[Point], float]) -> list[tuple[str, str, float]]:
    """(stage before, stage after, x) wherever the dominant stage changes between neighbouring points; x where
    the two stages' times are equal, interpolated in log-log."""
    found = []
    for before, after in zip(points, points[1:], strict=False):
        a, b = before.dominant(), after.dominant()
        if a == b:
            continue
        gap_before = math.log(max(before.cpu[a], 1e-9) / max(before.cpu[b], 1e-9))
        gap_after = math.log(max(after.cpu[a], 1e-9) / max(after.cpu[b], 1e-9))
        share = gap_before / (gap_before - gap_after) if gap_before != gap_after else 0.5
        found.append((a, b, math.exp(math.log(x(before)) + share * (math.log(x(after)) - math.log(x(before))))))
    return found


def summarise(name: str, unit: str, points: list[Point], x: Callable[[Point], float]) -> None:
    fitted = upper_half(points)
    values = exponents(points, x)
    print(f"\nexponents of CPU time against {unit} (least squares over {x(fitted[0]):,.0f} to {x(fitted[-1]):,.0f}):")
    print("  " + ", ".join(f"{stage} {value:.2f}" for stage, value in values.items()))
    for stage in STAGES:
        where = [f"{x(p):,.0f}" for p in points if p.dominant() == stage]
        if where:
            print(f"  {stage} dominates at {unit} = {', '.join(where)}")
    for before, after, at in crossovers(points, x):
        print(f"  crossover: {after} overtakes {before} at about {at:,.0f} {unit}")
        print(f"RESULT cost_curves.crossover_{name}_{before}_to_{after}={at:.0f}")
    for stage, value in values.items():
        print(f"RESULT cost_curves.exponent_{name}_{stage}={value:.3f}")
    top = points[-1]
    print(f"RESULT cost_curves.dominant_share_{name}_max={top.cpu[top.dominant()] / top.stage_sum:.3f}")


def plot(path: Path, by_count: list[Point], by_pixels: list[Point], height: int, count: int) -> None:
    """Two log-log panels: CPU ms per stage (and the step) against Gaussians and against pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12.5, 4.5))
    panels = ((axes[0], by_count, lambda p: p.count, f"Gaussians (at {frame(height)[0]}x{height})"),
              (axes[1], by_pixels, lambda p: p.pixels, f"pixels (at {count:,} Gaussians)"))
    for axis, points, x, label in panels:
        xs = [x(p) for p in points]
        for stage in STAGES:
            axis.loglog(xs, [max(p.cpu[stage], 1e-3) for p in points], marker="o", label=stage)
        axis.loglog(xs, [p.step_cpu for p in points], color="black", linewidth=2, marker="s", label="step")
        axis.set_xlabel(label)
        axis.set_ylabel("CPU ms per step (one thread)")
        axis.grid(True, which="both", alpha=0.3)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=9)
    figure.suptitle("cpp 3DGS training step, stage by stage (benchmarks/cost_curves.py)")
    figure.tight_layout(rect=(0, 0, 0.84, 1))  # the legend on the right, clear of the curves
    figure.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaussians", type=int, nargs="+", default=GAUSSIANS, help="counts of the first sweep")
    parser.add_argument("--height", type=int, default=480, help="image height of the Gaussian sweep (16:9)")
    parser.add_argument("--heights", type=int, nargs="+", default=HEIGHTS, help="image heights of the second sweep")
    parser.add_argument("--count", type=int, default=300_000, help="Gaussians of the resolution sweep")
    parser.add_argument("--steps", type=int, default=5, help="instrumented (and as many plain) steps per point")
    parser.add_argument("--big-steps", type=int, default=3, help="steps per point from --big Gaussians on")
    parser.add_argument("--big", type=int, default=1_000_000, help="where --big-steps replaces --steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed instrumented + plain step pairs per point")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: thread CPU time is "
                        "then the step's whole CPU time)")
    parser.add_argument("--plot", type=Path, help="write the two log-log panels here (needs matplotlib)")
    parser.add_argument("--quick", action="store_true", help="2k/8k Gaussians, 64x36/128x72, 2 steps (a smoke run)")
    args = parser.parse_args()
    if min(len(args.gaussians), len(args.heights)) < 2:
        parser.error("--gaussians and --heights need at least 2 values each (the exponents are fitted)")
    if args.quick:
        args.gaussians, args.heights, args.height, args.count = QUICK_GAUSSIANS, QUICK_HEIGHTS, 72, 4_000
        args.steps, args.big_steps, args.warmup = 2, 2, 1
    if load_extension() is None:
        raise SystemExit("the C++ rasterizer did not build; see the warning above")
    torch.set_num_threads(args.threads)
    print(f"cpp training step, one view, SH degree 3, {args.threads} torch thread(s); CPU ms "
          f"(time.thread_time), medians of {args.steps} steps ({args.big_steps} from {args.big:,} Gaussians)")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    by_count = sweep_gaussians(args.gaussians, args.height, lambda n: args.big_steps if n >= args.big else args.steps,
                               args.warmup)
    by_pixels = sweep_pixels(args.count, args.heights, args.big_steps if args.count >= args.big else args.steps,
                             args.warmup, args.height)
    summarise("gaussians", "Gaussians", by_count, lambda p: p.count)
    summarise("pixels", "pixels", by_pixels, lambda p: p.pixels)
    ratios = [p.stage_sum / p.step_cpu for p in by_count + by_pixels]
    print(f"RESULT cost_curves.stages_over_step_min={min(ratios):.3f}")
    print(f"RESULT cost_curves.stages_over_step_max={max(ratios):.3f}")
    if args.plot:
        plot(args.plot, by_count, by_pixels, args.height, args.count)


if __name__ == "__main__":
    main()

"""Adam step time on the Gaussians' parameters: torch's default (for-loop) Adam against ``fused=True``.

Usage: ``python benchmarks/optimizer.py [--gaussians 120000] [--sh-degree 3] [--threads 2] [--quick]``.

The parameters are the module's own (``init_from_points`` + ``make_parameters``: means, log-scales,
quaternions, opacity logits, SH DC and the higher bands, one parameter group each), with random gradients. Both
optimizers step the same parameters in one process, alternately, after warm-up steps; each time is the
median of ``--repeats``. The module uses the fused step wherever its parameters are on the CPU or CUDA.
Prints a table and ``RESULT`` lines.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_grendel.splatting.gaussians import init_from_points, make_parameters

WARMUP = 3


def gaussian_parameters(count: int, sh_degree: int, seed: int = 0) -> list[torch.nn.Parameter]:
    """The module's raw parameters (``init_from_points`` + ``make_parameters``) of ``count`` random
    Gaussians, each with a random gradient."""
    g = torch.Generator().manual_seed(seed)
    raw = init_from_points(torch.rand(count, 3, generator=g), torch.rand(count, 3, generator=g), sh_degree)
    params = list(make_parameters(raw).values())
    for param in params:
        param.grad = torch.randn(param.shape, generator=g)
    return params


def make_adam(params: list[torch.nn.Parameter], fused: bool) -> torch.optim.Adam:
    """Adam with one group per parameter, as the module builds it."""
    return torch.optim.Adam([{"params": [p], "lr": 1e-3} for p in params], eps=1e-15, fused=fused)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaussians", type=int, default=120_000, help="number of Gaussians (default 120000)")
    parser.add_argument("--sh-degree", type=int, default=3, help="SH degree of the colours (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=21, help="timed steps per optimizer (default 21)")
    parser.add_argument("--quick", action="store_true", help="2,000 Gaussians, 3 repeats (a smoke run)")
    args = parser.parse_args()
    count, repeats = (2_000, 3) if args.quick else (args.gaussians, args.repeats)
    torch.set_num_threads(args.threads)
    optimizers = {name: make_adam(gaussian_parameters(count, args.sh_degree), fused=name == "fused")
                  for name in ("default", "fused")}
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for index in range(WARMUP + repeats):
        for name, optimizer in optimizers.items():
            began = time.perf_counter()
            optimizer.step()
            if index >= WARMUP:
                times[name].append(time.perf_counter() - began)
    medians = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    print(f"Adam step, {count:,} Gaussians, SH degree {args.sh_degree}, {args.threads} threads, "
          f"median of {repeats} (alternating, after {WARMUP} warm-up steps)")
    print("| optimizer | ms / step |\n|---|---|")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.2f} |")
    print(f"RESULT optimizer.default_ms={medians['default']:.3f}")
    print(f"RESULT optimizer.fused_ms={medians['fused']:.3f}")
    print(f"RESULT optimizer.speedup={medians['default'] / medians['fused']:.2f}")


if __name__ == "__main__":
    main()

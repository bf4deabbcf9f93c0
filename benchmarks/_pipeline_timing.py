"""Step times of several pipeline runtimes measured side by side on every rank (shared by two benchmarks)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch
import torch.distributed as dist

from lightning_grendel.pipeline import PipelineRuntime


def median_step_seconds(runtimes: Mapping[str, PipelineRuntime], inputs: torch.Tensor, targets: torch.Tensor,
                        steps: int) -> dict[str, float]:
    """Median over ``steps`` timed steps of each runtime's slowest rank; runtimes take turns every step.

    Step 0 builds plans and process groups and is not timed. Every runtime is closed afterwards.
    """
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for step in range(steps + 1):
        for name, runtime in runtimes.items():
            dist.barrier()
            start = time.perf_counter()
            runtime.step(inputs, targets)
            elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if step > 0:
                times[name].append(float(elapsed))
    for runtime in runtimes.values():
        runtime.close()
    return {name: statistics.median(values) for name, values in times.items()}

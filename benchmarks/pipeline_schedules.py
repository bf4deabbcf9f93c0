"""Pipeline schedules side by side: measured step time against the clock table's prediction.

Set-up (emulated, so that 2 shared CPU cores give a meaningful measurement): 4 stage meshes of one
gloo process each; every model chunk sleeps for its share of a fixed per-rank compute time (forward
F, input-gradient B-W, weight-gradient W, each split over the rank's v chunks), and every transfer
starts ``--latency-ms`` late (the runtime's ``transfer_latency_s``). Sleeping does not use a core,
so the processes do not contend; what remains on top of the prediction is the runtime's own
overhead (Python, gloo messages, autograd). The split of a chunk's backward into its input and
weight parts is exact here; on a real model B + W cost more than one fused backward (measured by
benchmarks/pipeline_vs_torch.py).

    python benchmarks/pipeline_schedules.py [--quick]

Prints a table and ``RESULT pipeline.<schedule>_step_s``, ``RESULT pipeline.interleaved_gain_fraction``,
``RESULT pipeline.zero_bubble_gain_fraction`` and the V schedules' ``RESULT pipeline.zbv_gain_fraction``
and ``RESULT pipeline.dualpipev_gain_fraction`` (measured gain over 1F1B / clock-table gain; DualPipeV
needs 8 micro-batches, so ``--quick`` leaves it out).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_grendel.pipeline import PipelineRuntime
from lightning_grendel.pipeline.schedules import SCHEDULES, clock_table, makespan
from lightning_grendel.pipeline.stages import Pipeline, PipelineStage
from lightning_grendel.resharding.mesh import Mesh

NUM_STAGES = 4
WIDTH = 16
CASES = [("gpipe", 1), ("1f1b", 1), ("eager_1f1b", 1), ("interleaved_1f1b", 2), ("eager_interleaved_1f1b", 2),
         ("zb_h1", 1), ("zbv", 2), ("dualpipev", 2)]
GAINS = (("interleaved", "interleaved_1f1b"), ("zero_bubble", "zb_h1"), ("zbv", "zbv"), ("dualpipev", "dualpipev"))


def runnable(microbatches: int) -> list[tuple[str, int]]:
    """The cases whose schedule takes ``microbatches`` on the benchmark's stage meshes."""
    return [(name, v) for name, v in CASES if microbatches >= SCHEDULES[name].min_rounds * NUM_STAGES]


class _Sleep(torch.autograd.Function):
    """Identity that sleeps ``forward_s`` in forward and ``backward_s`` in backward: a fixed-cost op."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_s: float, backward_s: float) -> torch.Tensor:
        time.sleep(forward_s)
        ctx.backward_s = backward_s
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        time.sleep(ctx.backward_s)
        return grad, None, None


class EmulatedChunk(nn.Module):
    """Input path costs ``forward_s`` and ``input_grad_s``, a parameter path ``weight_grad_s``.

    The first chunk's input is data (no gradient), so its input-gradient cost sits behind a gain
    parameter: its backward then costs what every other chunk's does.
    """

    def __init__(self, forward_s: float, input_grad_s: float, weight_grad_s: float, first: bool) -> None:
        super().__init__()
        self.costs = (forward_s, input_grad_s, weight_grad_s)
        self.weight = nn.Parameter(torch.zeros(WIDTH))
        self.gain = nn.Parameter(torch.ones(WIDTH)) if first else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        forward_s, input_grad_s, weight_grad_s = self.costs
        if self.gain is not None:
            x = x * self.gain
        return _Sleep.apply(x, forward_s, input_grad_s) + _Sleep.apply(self.weight, 0.0, weight_grad_s)


def median_step_seconds(runtimes: Mapping[str, PipelineRuntime], inputs: torch.Tensor, targets: torch.Tensor,
                        steps: int) -> dict[str, float]:
    """Median over ``steps`` timed steps of each runtime's slowest rank; runtimes take turns every step.

    Also used by ``resharding.py``.

    Step 0 builds plans and process groups and is not timed. Every runtime is closed afterwards.
    """
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for step in range(steps + 1):
        for name, runtime in runtimes.items():
            dist.barrier()
            start = time.perf_counter()
            runtime.step((inputs, targets))
            elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if step > 0:
                times[name].append(float(elapsed))
    for runtime in runtimes.values():
        runtime.close()
    return {name: statistics.median(values) for name, values in times.items()}


def _loss(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (y * target).sum(dim=1).mean()


def _pipeline(virtual: int, costs: tuple[float, float, float]) -> Pipeline:
    forward_s, backward_s, weight_s = (t / virtual for t in costs)
    chunks = [EmulatedChunk(forward_s, backward_s - weight_s, weight_s, c == 0) for c in range(NUM_STAGES * virtual)]
    return Pipeline([PipelineStage(chunk) for chunk in chunks], _loss)


def _rank(rank: int, world: int, init: str, costs: tuple[float, float, float], latency_s: float,
          microbatches: int, steps: int, out: dict) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    meshes = [Mesh([r], (1, 1)) for r in range(world)]
    runtimes = {name: PipelineRuntime(_pipeline(v, costs), meshes, schedule=name, num_microbatches=microbatches,
                                      transfer_latency_s=latency_s, transport="dist")
                for name, v in runnable(microbatches)}
    x, target = torch.randn(2 * microbatches, WIDTH), torch.randn(2 * microbatches, WIDTH)
    medians = median_step_seconds(runtimes, x, target, steps)
    if rank == 0:
        out.update(medians)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 micro-batches, 10 ms forward, 1 timed step")
    parser.add_argument("--latency-ms", type=float, default=5.0, help="emulated per-transfer latency")
    parser.add_argument("--forward-ms", type=float, default=None, help="forward time per rank and micro-batch")
    args = parser.parse_args()
    forward = (args.forward_ms or (10.0 if args.quick else 30.0)) / 1e3
    costs = (forward, 2 * forward, forward)  # forward, full backward, its weight-gradient part
    microbatches, steps = (4, 1) if args.quick else (8, 3)
    latency = args.latency_ms / 1e3
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        out = manager.dict()
        mp.start_processes(_rank, args=(NUM_STAGES, os.path.join(tmp, "init"), costs, latency, microbatches, steps,
                                        out), nprocs=NUM_STAGES, start_method="spawn")
        measured = dict(out)
        manager.shutdown()
    cases = runnable(microbatches)
    predicted = {name: makespan(clock_table(name, NUM_STAGES, microbatches, virtual_stages=v, forward_time=costs[0],
                                            backward_time=costs[1], weight_time=costs[2], latency=latency))
                 for name, v in cases}
    print(f"\n{NUM_STAGES} stages x 1 rank, {microbatches} micro-batches, per rank and micro-batch: forward "
          f"{costs[0] * 1e3:.0f} ms, backward {costs[1] * 1e3:.0f} ms (weight part {costs[2] * 1e3:.0f} ms), "
          f"transfer latency {args.latency_ms:.0f} ms, median of {steps} step(s)\n")
    print("| schedule | v | clock table (ms) | measured (ms) | measured / predicted |")
    print("|---|---|---|---|---|")
    for name, v in cases:
        print(f"| {name} | {v} | {predicted[name] * 1e3:.0f} | {measured[name] * 1e3:.0f} | "
              f"{measured[name] / predicted[name]:.3f} |")
    print()
    for name, _ in cases:
        print(f"RESULT pipeline.{name}_step_s={measured[name]:.4f}")
    for label, name in GAINS:
        if name not in measured:
            continue
        gain = (measured["1f1b"] - measured[name]) / (predicted["1f1b"] - predicted[name])
        print(f"RESULT pipeline.{label}_gain_fraction={gain:.3f}")


if __name__ == "__main__":
    main()

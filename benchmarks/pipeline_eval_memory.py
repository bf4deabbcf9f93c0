"""Peak memory per rank of pipelined evaluation against every rank running the whole model.

Before pipelined evaluation, ``validate``/``test``/``predict`` under ``PipelineStrategy`` gathered
every stage's weights and ran the whole model on the whole batch on every rank. Now each rank runs
its stage on micro-batches (``PipelineRuntime.evaluate``). The model here is a small language model
whose largest tensor is the last stage's logits ``[B, T, V]``, as in most LMs.

Each mode runs in fresh gloo processes (one per stage), evaluates a small batch first (process
groups are made there), then resets the high-water mark and evaluates the batch. Memory is the
resident set: ``VmHWM - VmRSS`` from ``/proc/self/status`` around that evaluation, i.e. what
evaluation adds at its peak (glibc is told to return buffers above 64 KiB to the system when they
are freed, so the mark follows live tensors). Both modes hold every stage's weights (the
LightningModule is built whole on every rank), so only what evaluation computes differs.

    python benchmarks/pipeline_eval_memory.py [--quick]

Prints a table and ``RESULT pipeline_eval.<mode>_rank<r>_mib`` lines.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_grendel.pipeline import PipelineRuntime
from lightning_grendel.pipeline.stages import Pipeline, PipelineStage
from lightning_grendel.resharding.mesh import Mesh


def _status(field: str) -> float:
    """A ``/proc/self/status`` memory field in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Linux 4.0+: writing 5 to clear_refs resets VmHWM to the current RSS."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


def _stages(vocab: int, width: int, layers: int) -> list[nn.Module]:
    torch.manual_seed(0)
    front = nn.Sequential(nn.Embedding(vocab, width), *(_Block(width) for _ in range(layers)))
    back = nn.Sequential(*(_Block(width) for _ in range(layers)), nn.LayerNorm(width), nn.Linear(width, vocab))
    return [front, back]


def _worker(rank: int, world: int, init_file: str, mode: str, sizes: dict, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    stages = _stages(sizes["vocab"], sizes["width"], sizes["layers"])
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, sizes["vocab"], (sizes["batch"], sizes["length"]), generator=generator)
    runtime = None
    if mode == "pipelined":
        pipeline = Pipeline([PipelineStage(m) for m in stages], lambda output, target: output.mean())
        runtime = PipelineRuntime(pipeline, [Mesh([r], (1, 1)) for r in range(world)],
                                  num_microbatches=sizes["microbatches"], transport="dist")

    def evaluate(tokens: torch.Tensor) -> float:
        with torch.no_grad():
            if runtime is None:  # every rank: the whole model on the whole batch
                return float(nn.Sequential(*stages)(tokens).float().mean())
            found = runtime.evaluate((tokens, tokens), lambda output, rows: float(output.float().mean()) * len(rows[0]))
            return sum(value for *_, value in found) / len(tokens) if found else 0.0

    evaluate(tokens[: sizes["microbatches"]])  # a small batch first: process groups are made here
    dist.barrier()
    _reset_peak()
    before = _status("VmRSS")
    checksum = evaluate(tokens)
    results[(mode, rank)] = (_status("VmHWM") - before, checksum)
    dist.barrier()
    if runtime is not None:
        runtime.close()
    dist.destroy_process_group()


def _run(mode: str, sizes: dict) -> dict[int, tuple[float, float]]:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # large buffers are returned to the system when freed
    with tempfile.TemporaryDirectory() as folder:
        manager = mp.Manager()
        results = manager.dict()
        mp.start_processes(_worker, args=(2, os.path.join(folder, "init"), mode, sizes, results), nprocs=2,
                           start_method="spawn")
        found = {rank: results[(mode, rank)] for rank in range(2)}
        manager.shutdown()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and batch (about a minute)")
    options = parser.parse_args()
    sizes = dict(vocab=8000, width=128, layers=2, batch=32, length=128, microbatches=4)
    if options.quick:
        sizes.update(vocab=4000, batch=16, length=64)
    print(f"2 stages on 2 gloo ranks, {sizes}")
    measured = {mode: _run(mode, sizes) for mode in ("all_stages", "pipelined")}
    logits = sizes["batch"] * sizes["length"] * sizes["vocab"] * 4 / 2**20
    print(f"(full-batch logits: {logits:.0f} MiB)")
    print("| rank | every rank runs the whole model (MiB) | pipelined evaluation (MiB) |")
    print("|---|---|---|")
    for rank in range(2):
        print(f"| {rank} | {measured['all_stages'][rank][0]:.0f} | {measured['pipelined'][rank][0]:.0f} |")
    for mode, per_rank in measured.items():
        for rank, (mib, _) in per_rank.items():
            print(f"RESULT pipeline_eval.{mode}_rank{rank}_mib={mib:.0f}")
    whole, piped = measured["all_stages"][0][1], measured["pipelined"][1][1]
    print(f"RESULT pipeline_eval.output_mean_difference={abs(whole - piped):.2e}")


if __name__ == "__main__":
    main()

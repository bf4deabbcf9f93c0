"""Peak memory per pipeline rank, weights included: evaluation and training, before and after weight release.

Under ``PipelineStrategy`` every rank builds the whole LightningModule. Before weight release every
rank kept every stage's weights; now each releases the other stages' parameters at its first step
(``StageResidency.release``, what the strategy calls). The modes, each in fresh gloo processes (one
per stage) running what the strategy runs (``PipelineRuntime``, ``StageResidency``):

- ``whole_model``: evaluation as it was before pipelined evaluation, every rank running the whole
  model on the whole batch;
- ``eval_kept`` / ``eval_released``: pipelined evaluation (``PipelineRuntime.evaluate``) with every
  weight kept / the other stage's released;
- ``train_kept`` / ``train_released``: two pipelined training steps with Adam (its state exists for the
  rank's own stage only either way) and every weight kept / the other stage's released.

The model is a small language model: embedding and MLP blocks in stage 0, MLP blocks and the head in
stage 1. Memory is the resident set: ``VmHWM`` from ``/proc/self/status`` over the phase (reset after
the model is built and, where it is, released), minus ``VmRSS`` before the model was built (after a
throwaway tiny pipeline has paid the one-time imports and gloo set-up); glibc is told to return
buffers above 64 KiB to the system when they are freed, so the mark follows live tensors.

    python benchmarks/pipeline_eval_memory.py [--quick]

Prints a table and ``RESULT pipeline_memory.<mode>_rank<r>_mib`` lines.
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
from torch.nn import functional as F

from lightning_grendel.pipeline import PipelineRuntime
from lightning_grendel.pipeline.residency import StageResidency
from lightning_grendel.pipeline.stages import Pipeline, PipelineStage
from lightning_grendel.resharding.mesh import Mesh

MODES = ("whole_model", "eval_kept", "eval_released", "train_kept", "train_released")


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


def _lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _worker(rank: int, world: int, init_file: str, mode: str, sizes: dict, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    meshes = [Mesh([r], (1, 1)) for r in range(world)]
    warm_up = PipelineRuntime(Pipeline([PipelineStage(m) for m in _stages(16, 4, 1)], _lm_loss), meshes,
                              num_microbatches=1, transport="dist")
    warm_up.evaluate((torch.zeros(1, 2, dtype=torch.long),) * 2, lambda *_: None)  # one-time imports, gloo
    warm_up.close()
    baseline = _status("VmRSS")
    stages = _stages(sizes["vocab"], sizes["width"], sizes["layers"])
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, sizes["vocab"], (sizes["batch"], sizes["length"] + 1), generator=generator)
    batch = (tokens[:, :-1], tokens[:, 1:])
    runtime = None
    if mode != "whole_model":
        runtime = PipelineRuntime(Pipeline([PipelineStage(m) for m in stages], _lm_loss), meshes,
                                  num_microbatches=sizes["microbatches"], transport="dist")
        runtime.evaluate(tuple(t[: sizes["microbatches"]] for t in batch), lambda *_: None)  # groups made here
    if mode.endswith("released"):
        StageResidency(nn.ModuleList(stages), stages, meshes, rank).release()
    dist.barrier()
    _reset_peak()
    checksum = 0.0
    if mode == "whole_model":
        with torch.no_grad():
            checksum = float(nn.Sequential(*stages)(batch[0]).float().mean())
    elif mode.startswith("eval"):
        found = runtime.evaluate(batch, lambda output, rows: float(output.float().mean()) * len(rows[0]))
        checksum = sum(value for *_, value in found) / sizes["batch"] if found else 0.0
    else:
        optimizer = torch.optim.Adam([p for m in runtime.modules for p in m.parameters()], lr=1e-3)
        for _ in range(2):
            optimizer.zero_grad()
            checksum = float(runtime.step(batch))
            optimizer.step()
    results[(mode, rank)] = (_status("VmHWM") - baseline, checksum)
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
    sizes = dict(vocab=8000, width=512, layers=2, batch=32, length=128, microbatches=4)
    if options.quick:
        sizes.update(vocab=4000, width=256, batch=16, length=64)
    print(f"2 stages on 2 gloo ranks, {sizes}")
    measured = {mode: _run(mode, sizes) for mode in MODES}
    stages = _stages(sizes["vocab"], sizes["width"], sizes["layers"])
    weights = [sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20 for m in stages]
    logits = sizes["batch"] * sizes["length"] * sizes["vocab"] * 4 / 2**20
    print(f"(weights: stage 0 {weights[0]:.0f} MiB, stage 1 {weights[1]:.0f} MiB; full-batch logits {logits:.0f} MiB)")
    print("| rank | " + " | ".join(MODES) + " |")
    print("|---" * (len(MODES) + 1) + "|")
    for rank in range(2):
        print(f"| {rank} | " + " | ".join(f"{measured[mode][rank][0]:.0f}" for mode in MODES) + " |")
    for mode, per_rank in measured.items():
        for rank, (mib, _) in per_rank.items():
            print(f"RESULT pipeline_memory.{mode}_rank{rank}_mib={mib:.0f}")
    checks = {mode: measured[mode][1][1] for mode in MODES}  # rank 1 holds the last stage's results
    print(f"RESULT pipeline_memory.eval_difference={abs(checks['whole_model'] - checks['eval_released']):.2e}")
    print(f"RESULT pipeline_memory.train_loss_difference={abs(checks['train_kept'] - checks['train_released']):.2e}")


if __name__ == "__main__":
    main()

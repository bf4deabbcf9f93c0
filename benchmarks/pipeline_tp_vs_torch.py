"""What torch.distributed.pipelining cannot run, measured: a tensor-parallel stage mesh feeding another shape.

The model of ``pipeline_vs_torch.py`` (``TinyTransformerLM``) with one more ``d x d`` Linear, the
"bridge", after block ``--split - 1``: this project splits only a stage's final ``nn.Linear`` over
the tensor-parallel axis (``column_parallel``), so the tensor-parallel stage must end in one. On 4
processes this project runs 2 stage meshes: stage 0 (embedding, blocks ``0..split-1``, bridge) on a
(1,2) mesh, both ranks computing the blocks and half of the bridge's output features each; stage 1
(the other blocks and the head) on a (2,1) mesh, each rank half of every micro-batch's rows (data
parallel); the boundary is resharded from feature-sharded to row-sharded, schedule ``1f1b``. torch
runs the same model (same weights, batches, micro-batches, Adam) as 4 single-rank stages with every
schedule of ``pipeline_vs_torch.py`` that takes the micro-batch count at 4 ranks, plus 2 stages x 2
data-parallel replicas (``Schedule1F1B`` on each replica's half of the batch, gradients averaged over
the replicas), its only way to use 4 ranks with fewer stages. Runs of a few steps rotate over all
configurations; tokens/s is the median over rounds. Losses of every step are compared with torch's.

On one host (loopback: this project's transport ``auto`` is shared memory, torch's is gloo), then
across two network-namespace hosts (``lightning_grendel/_two_hosts.py``, ranks 0-1 on host 0 and 2-3
on host 1, the link shaped with ``tc tbf`` to ``--mbit`` as ``benchmarks/two_hosts.py`` does; needs
root):

    python benchmarks/pipeline_tp_vs_torch.py            # loopback, then two hosts at 1000 Mbit/s
    python benchmarks/pipeline_tp_vs_torch.py --quick --loopback-only    # a small model (a test)

Prints a table per setting and ``RESULT pipeline_vs_torch.tp_vs_best_torch_{loopback,two_hosts}``
(this project's tokens/s over the best torch configuration's), ``RESULT
pipeline_vs_torch.tp.<setting>.<configuration>_tokens_s`` and ``RESULT pipeline_vs_torch.tp.loss_gap``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from pipeline_vs_torch import Config, _batch, _Ours, _splits, _Torch, join, runnable
from resharding import spawn_ranks
from torch import nn

from lightning_grendel._two_hosts import TwoHosts, unavailable_reason
from lightning_grendel.pipeline import Pipeline, PipelineStage
from lightning_grendel.pipeline.examples.tiny_lm import TinyTransformerLM, lm_loss
from lightning_grendel.resharding.mesh import Mesh

WORLD = 4
MESHES = [Mesh([0, 1], (1, 2)), Mesh([2, 3], (2, 1))]  # tensor parallel, then data parallel
OURS_SCHEDULES = ("1f1b", "zb_h1")
DATA_PARALLEL = "torch_1f1b_2stages_2dp"


class _Copy(nn.Module):
    """A copy of its input: torch's zero-bubble stages ``detach_()`` their output, which a Linear's 3-D output
    (a view) refuses, so torch's chunks that end with the bridge end with this (one activation copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def tp_chunks(config: Config, bounds: list[int], split: int, for_torch: bool = False) -> list[nn.Sequential]:
    """The model cut at block indices ``bounds`` (embedding first, head last), the bridge after block ``split-1``."""
    torch.manual_seed(0)  # the same initial weights for every copy
    lm = TinyTransformerLM(config.vocab, config.d_model, config.heads, config.layers, config.seq_len)
    bridge = nn.Linear(config.d_model, config.d_model)
    layers = [*lm.blocks[:split], bridge, *lm.blocks[split:]]

    def position(block: int) -> int:  # where block ``block`` starts in ``layers``
        return block + (block >= split)

    chunks = []
    for index, (start, stop) in enumerate(zip(bounds, bounds[1:], strict=False)):
        parts = [lm.embed] if index == 0 else []
        parts += layers[position(start):position(stop)]
        parts += [lm.head] if index == len(bounds) - 2 else []
        parts += [_Copy()] if for_torch and parts[-1] is bridge else []
        chunks.append(nn.Sequential(*parts))
    return chunks


def ours_pipeline(config: Config, split: int) -> Pipeline:
    """Stage 0 ends with the bridge, column-parallel over the (1,2) mesh; stage 1 takes rows over (2,1)."""
    first, second = tp_chunks(config, [0, split, config.layers], split)
    return Pipeline([PipelineStage(first, "R", column_parallel=str(len(first) - 1)), PipelineStage(second, "S0")],
                    lm_loss)


class _TorchDataParallel:
    """torch's 1F1B over 2 stages on each of 2 replicas (ranks 0,1 and 2,3), each on half of every batch."""

    def __init__(self, config: Config, split: int) -> None:
        from torch.distributed import pipelining

        rank = dist.get_rank()
        pipes = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        self.replicas = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        self.stage, self.replica = rank % 2, rank // 2
        module = tp_chunks(config, [0, config.layers // 2, config.layers], split, for_torch=True)[self.stage]
        stage = pipelining.PipelineStage(module, self.stage, 2, torch.device("cpu"), group=pipes[self.replica])
        self.schedule = pipelining.Schedule1F1B(stage, max(1, config.microbatches // 2), loss_fn=lm_loss)
        self.params = list(module.parameters())
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr)

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        half = batch[0].shape[0] // 2
        ids, target = (t[self.replica * half:(self.replica + 1) * half] for t in batch)
        losses: list[torch.Tensor] = []
        if self.stage == 0:
            self.schedule.step(ids)
        else:
            self.schedule.step(target=target, losses=losses)
        for p in self.params:  # the two replicas' gradients averaged, as one replica on the whole batch
            dist.all_reduce(p.grad, group=self.replicas[self.stage])
            p.grad /= 2
        self.optimizer.step()
        loss = torch.tensor(float(torch.stack(losses).detach().mean()) / 2 if losses else 0.0, dtype=torch.float64)
        dist.all_reduce(loss)
        return float(loss)

    def close(self) -> None:
        pass


def measure(rank: int, world: int, config: Config, split: int) -> dict:
    """Every configuration: one untimed step, then ``config.rounds`` rotations of ``config.steps`` timed steps."""
    runners: dict = {f"ours_tp_{s}": _Ours(ours_pipeline(config, split), MESHES, s, config) for s in OURS_SCHEDULES}
    for ours, theirs, chunks in runnable(world, config):
        bounds = [0, *_splits(config.layers, world * chunks), config.layers]
        runners[f"torch_{ours}_4stages"] = _Torch(theirs, ours, config, world, chunks,
                                                  tp_chunks(config, bounds, split, for_torch=True))
    if config.batch % 2 == 0 and config.layers % 2 == 0:
        runners[DATA_PARALLEL] = _TorchDataParallel(config, split)
    names = list(runners)
    losses: dict[str, list[float]] = {name: [] for name in names}
    seconds: dict[str, list[float]] = {name: [] for name in names}

    def run(name: str, steps: int) -> float:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            losses[name].append(runners[name].step(_batch(config, len(losses[name]))))
        dist.barrier()
        return time.perf_counter() - start

    for name in names:  # warm-up: plans, shape inference, connections
        run(name, 1)
    for round_index in range(config.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(run(name, config.steps))
    for runner in runners.values():
        runner.close()
    dist.barrier()
    return {"seconds": seconds, "losses": losses}


def _loopback_rank(rank: int, world: int, init: str, config: Config, split: int, out: dict) -> None:
    join(rank, world, init)
    result = measure(rank, world, config, split)
    if rank == 0:
        out.update(result)
    dist.destroy_process_group()


def host_rank(rank: int, world: int, split: int, **fields: object) -> dict:
    """A rank on a namespace host (the gloo group already joined by ``lightning_grendel._two_hosts``)."""
    return measure(rank, world, Config(**fields), split)


def report(setting: str, result: dict, config: Config, where: str) -> float:
    """Print the setting's table and RESULT lines; return the largest loss gap to torch's configurations."""
    rates = {name: config.tokens * config.steps / statistics.median(times)
             for name, times in result["seconds"].items()}
    ours = [name for name in rates if name.startswith("ours")]
    best = {side: max(names, key=rates.__getitem__) for side, names in
            (("ours", ours), ("torch", [name for name in rates if name not in ours]))}
    gap = max(abs(a - b) for name in rates if name not in ours for mine in ours
              for a, b in zip(result["losses"][mine], result["losses"][name], strict=True))
    print(f"\n{setting} ({where}): tokens/s, median of {config.rounds} rounds of {config.steps} steps")
    for name, rate in rates.items():
        print(f"  {name:<32} {rate:>9.0f}{'  (best)' if name in best.values() else ''}")
    for name, rate in rates.items():
        print(f"RESULT pipeline_vs_torch.tp.{setting}.{name}_tokens_s={rate:.1f}")
    ratio = rates[best["ours"]] / rates[best["torch"]]
    print(f"RESULT pipeline_vs_torch.tp_vs_best_torch_{setting}={ratio:.3f}")
    return gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 layers, d=64, seq 32, vocab 256, 1 round of 1 step")
    parser.add_argument("--split", type=int, default=None,
                        help="blocks in the tensor-parallel stage (default 3/8 of the layers: its two ranks both "
                             "compute them, the data-parallel stage's ranks half of the rest's rows each)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 2)")
    parser.add_argument("--rounds", type=int, default=None, help="rotations over the configurations (default 3)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 8)")
    parser.add_argument("--microbatches", type=int, default=None, help="micro-batches per step (default 4)")
    parser.add_argument("--mbit", type=float, default=1000.0, help="two-host link rate in Mbit/s, both directions")
    parser.add_argument("--loopback-only", action="store_true", help="skip the two-host run")
    args = parser.parse_args()
    config = Config(layers=8, d_model=64, seq_len=32, vocab=256, rounds=1, steps=1) if args.quick else Config()
    changes = {name: getattr(args, name) for name in ("steps", "rounds", "batch", "microbatches")
               if getattr(args, name) is not None}
    config = Config(**{**config.__dict__, **changes})
    split = args.split if args.split is not None else max(1, config.layers * 3 // 8)
    if not 0 < split < config.layers:
        parser.error(f"--split {split} must leave blocks on both stages (1..{config.layers - 1})")
    print(f"Model: {config.layers} layers (+ a d x d bridge after block {split - 1}), d={config.d_model}, "
          f"{config.heads} heads, seq {config.seq_len}, vocab {config.vocab}; {config.batch} sequences "
          f"({config.tokens} tokens) per step in {config.microbatches} micro-batches; Adam lr {config.lr}; "
          f"{WORLD} processes, one thread each, on {os.cpu_count()} CPUs")
    gap = report("loopback", spawn_ranks(_loopback_rank, WORLD, config, split), config, "one host")
    if not args.loopback_only:
        reason = unavailable_reason()
        if reason is not None:
            sys.exit(f"two hosts need network namespaces here: {reason}")
        os.chdir(Path(__file__).resolve().parent)  # the ranks import this script and its neighbours from here
        with TwoHosts() as hosts:
            hosts.shape(args.mbit)
            result = hosts.run("pipeline_tp_vs_torch:host_rank", (2, 2), timeout_s=600, split=split,
                               **config.__dict__)
        gap = max(gap, report("two_hosts", result[0], config, f"ranks 0-1 | 2-3, link {args.mbit:g} Mbit/s"))
    print(f"RESULT pipeline_vs_torch.tp.loss_gap={gap:.2e}")


if __name__ == "__main__":
    main()

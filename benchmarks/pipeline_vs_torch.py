"""This project's pipeline against torch.distributed.pipelining, on the same model doing real work.

One GPT-like decoder (``TinyTransformerLM``: 8 pre-norm causal blocks, d=256, 4 heads, seq 128, vocab
4096), cut the same way for both, trained with the same micro-batches and the same optimiser (Adam)
from the same initial weights on the same batches, on CPU with gloo and one thread per rank. This
project runs ``PipelineRuntime`` (the engine ``PipelineStrategy`` drives, here called from a plain
loop as torch's schedules are; one rank per stage mesh, default transport: shared memory on one
host); torch runs ``Schedule1F1B``, ``ScheduleInterleaved1F1B`` (2 chunks per rank) and
``ScheduleInterleavedZeroBubble`` (one chunk per rank: ZB-H1's zero-bubble order),
``ScheduleZBVZeroBubble`` and ``ScheduleDualPipeV`` (two chunks per rank in a V) against this
project's ``1f1b``, ``interleaved_1f1b``, ``zb_h1``, ``zbv`` and ``dualpipev`` (DualPipeV only where
the micro-batches number at least twice the ranks, as both require). Each world (2 or 4 ranks) holds one model
copy per (framework, schedule); runs of a few steps alternate between the frameworks (the order
flips every round), tokens/s is the median over rounds. Peak memory is each rank's resident set
above its level before the step (freed memory handed back with ``malloc_trim`` first), sampled
every millisecond in an untimed step. Losses of every step of both are compared. Before the worlds
start, one process times a middle chunk's (two blocks') fused backward against ZB-H1's ``B`` + ``W``
(``lightning_grendel/pipeline/split_backward.py``), alternating, median of 15, in thread CPU time
(the machine is shared: wall time there measures the neighbours).

    python benchmarks/pipeline_vs_torch.py            # 2 and 4 stages, 3 rounds of 2 steps
    python benchmarks/pipeline_vs_torch.py --quick    # a small model, 2 stages, 1 round (a test)

Prints a table and ``RESULT pipeline_vs_torch.<S>stages.<schedule>.{ours,torch}_tokens_s``,
``...ratio`` (ours / torch), ``...{ours,torch}_peak_mib`` (largest over ranks),
``RESULT pipeline_vs_torch.min_ratio``, ``RESULT pipeline_vs_torch.loss_gap`` (largest absolute
difference of a step's loss) and ``RESULT pipeline_vs_torch.split_over_fused_backward`` (B + W time /
fused backward time).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from resharding import spawn_ranks
from torch import nn

from lightning_grendel.pipeline import Pipeline, PipelineRuntime
from lightning_grendel.pipeline.examples.tiny_lm import CausalBlock, TinyTransformerLM, lm_loss
from lightning_grendel.pipeline.schedules import SCHEDULES as REGISTRY
from lightning_grendel.pipeline.schedules import chunk_stages
from lightning_grendel.pipeline.split_backward import input_gradient
from lightning_grendel.resharding.mesh import Mesh

# (this project's schedule, torch's schedule class, chunks per rank)
SCHEDULES = [("1f1b", "Schedule1F1B", 1), ("interleaved_1f1b", "ScheduleInterleaved1F1B", 2),
             ("zb_h1", "ScheduleInterleavedZeroBubble", 1), ("zbv", "ScheduleZBVZeroBubble", 2),
             ("dualpipev", "ScheduleDualPipeV", 2)]


@dataclass(frozen=True)
class Config:
    """The model and the step: ``batch`` sequences of ``seq_len`` tokens in ``microbatches`` micro-batches."""

    layers: int = 8
    d_model: int = 256
    heads: int = 4
    seq_len: int = 128
    vocab: int = 4096
    batch: int = 8
    microbatches: int = 4
    steps: int = 2
    rounds: int = 3
    lr: float = 1e-3

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


def runnable(world: int, config: Config) -> list[tuple[str, str, int]]:
    """The schedule pairs that take ``config.microbatches`` on ``world`` ranks."""
    return [case for case in SCHEDULES if config.microbatches >= REGISTRY[case[0]].min_rounds * world]


def _splits(layers: int, chunks: int) -> list[int]:
    if layers % chunks:
        raise ValueError(f"{layers} layers do not split evenly into {chunks} chunks")
    return [i * layers // chunks for i in range(1, chunks)]


def _model(config: Config, chunks: int) -> TinyTransformerLM:
    torch.manual_seed(0)  # the same initial weights for every copy
    return TinyTransformerLM(config.vocab, config.d_model, config.heads, config.layers, config.seq_len,
                             stage_splits=_splits(config.layers, chunks))


def _batch(config: Config, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + index)
    tokens = torch.randint(0, config.vocab, (config.batch, config.seq_len + 1), generator=generator)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


class _Ours:
    """A step of this project's runtime; every rank passes the whole batch."""

    def __init__(self, pipeline: Pipeline, meshes: list[Mesh], schedule: str, config: Config) -> None:
        self.runtime = PipelineRuntime(pipeline, meshes, schedule=schedule, num_microbatches=config.microbatches)
        params = [p for module in self.runtime.modules for p in module.parameters()]
        self.optimizer = torch.optim.Adam(params, lr=config.lr)

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.runtime.step(batch)
        self.optimizer.step()
        return float(loss)

    def close(self) -> None:
        self.runtime.close()


class _Torch:
    """A step of torch's schedule from a plain loop: input on the first stage, target and losses on the last."""

    def __init__(self, schedule: str, ours: str, config: Config, world: int, chunks: int,
                 modules: list[nn.Module]) -> None:
        from torch.distributed import pipelining

        rank = dist.get_rank()
        indices = [c for c, stage in enumerate(chunk_stages(ours, world, chunks)) if stage == rank]
        stages = [pipelining.PipelineStage(modules[i], i, world * chunks, torch.device("cpu")) for i in indices]
        cls = getattr(pipelining, schedule)
        self.schedule = cls(stages if cls is not pipelining.Schedule1F1B else stages[0], config.microbatches,
                            loss_fn=lm_loss)
        self.first, self.last = 0 in indices, world * chunks - 1 in indices
        params = [p for i in indices for p in modules[i].parameters()]
        self.optimizer = torch.optim.Adam(params, lr=config.lr)

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        ids, target = batch
        losses: list[torch.Tensor] = []
        args = (ids,) if self.first else ()
        kwargs = {"target": target, "losses": losses} if self.last else {}
        self.schedule.step(*args, **kwargs)
        self.optimizer.step()
        loss = torch.tensor(float(torch.stack(losses).detach().mean()) if self.last else 0.0, dtype=torch.float64)
        dist.all_reduce(loss)  # the whole batch's loss on every rank, as this project's step returns it
        return float(loss)

    def close(self) -> None:
        pass


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def _peak_rss() -> Iterator[list[int]]:
    """Yields a list that holds, on exit, the peak resident set above the level at entry (bytes)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            peak[0] = max(peak[0], _rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    result = [0]
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result[0] = max(peak[0], _rss()) - base


def join(rank: int, world: int, init: str) -> None:
    """One thread per rank, then the gloo group through the rendezvous file ``init``."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))


def _rank(rank: int, world: int, init: str, config: Config, out: dict) -> None:
    join(rank, world, init)
    runners: dict[tuple[str, str], _Ours | _Torch] = {}
    cases = runnable(world, config)
    for ours, theirs, chunks in cases:
        pipeline = _model(config, world * chunks).pipeline_stages()
        runners[(ours, "ours")] = _Ours(pipeline, [Mesh([r], (1, 1)) for r in range(world)], ours, config)
        modules = [stage.module for stage in _model(config, world * chunks).pipeline_stages().stages]
        runners[(ours, "torch")] = _Torch(theirs, ours, config, world, chunks, modules)
    losses: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
    peaks: dict[tuple[str, str], int] = {}

    def run(key: tuple[str, str], steps: int, clock: Callable[[], float] = time.perf_counter) -> float:
        dist.barrier()
        start = clock()
        for _ in range(steps):
            losses[key].append(runners[key].step(_batch(config, len(losses[key]))))
        dist.barrier()
        return clock() - start

    for key in runners:  # warm-up: first-step plans, shape inference, connections
        run(key, 1)
    for round_index in range(config.rounds):
        for ours, _, _ in cases:
            order = ("ours", "torch") if round_index % 2 == 0 else ("torch", "ours")
            for framework in order:
                seconds[(ours, framework)].append(run((ours, framework), config.steps))
    for key in runners:  # memory, untimed
        with _peak_rss() as peak:
            run(key, 1)
        peaks[key] = peak[0]
    gathered: list[dict] = [{}] * world
    dist.all_gather_object(gathered, peaks)
    if rank == 0:
        out["seconds"] = seconds
        out["losses"] = losses
        out["peaks"] = {key: [part[key] for part in gathered] for key in runners}
    for runner in runners.values():
        runner.close()
    dist.barrier()
    dist.destroy_process_group()


def split_over_fused(config: Config, repeats: int = 15) -> float:
    """Median CPU time of a two-block chunk's B + W over its fused backward (one micro-batch, one thread)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    chunk = torch.nn.Sequential(*(CausalBlock(config.d_model, config.heads) for _ in range(2)))
    params = list(chunk.parameters())
    rows = config.batch // config.microbatches
    x = torch.randn(rows, config.seq_len, config.d_model)
    grad = torch.randn_like(x)

    def fused() -> float:
        y = chunk(x.requires_grad_(True))
        start = time.thread_time()
        torch.autograd.backward([y], [grad])
        return time.thread_time() - start

    def split() -> float:
        y = chunk(x.requires_grad_(True))
        start = time.thread_time()
        _, weight = input_gradient([x], [y], [grad], params)
        weight.run()
        return time.thread_time() - start

    times: dict[Callable[[], float], list[float]] = {fused: [], split: []}
    for repeat in range(repeats + 1):
        for run in (fused, split) if repeat % 2 else (split, fused):
            chunk.zero_grad(set_to_none=True)
            x.grad = None
            elapsed = run()
            if repeat:
                times[run].append(elapsed)
    return statistics.median(times[split]) / statistics.median(times[fused])


def measure(world: int, config: Config) -> dict:
    return spawn_ranks(_rank, world, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 layers, d=64, seq 32, vocab 256, 2 stages, 1 round")
    parser.add_argument("--stages", type=int, nargs="+", default=None, help="stage counts (default 2 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 2)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 8)")
    parser.add_argument("--microbatches", type=int, default=None, help="micro-batches per step (default 4)")
    args = parser.parse_args()
    config = Config(layers=4, d_model=64, seq_len=32, vocab=256, rounds=1, steps=1) if args.quick else Config()
    changes = {name: getattr(args, name) for name in ("steps", "rounds", "batch", "microbatches")
               if getattr(args, name) is not None}
    config = Config(**{**config.__dict__, **changes})
    stages = args.stages or ([2] if args.quick else [2, 4])
    print(f"Model: {config.layers} layers, d={config.d_model}, {config.heads} heads, seq {config.seq_len}, vocab "
          f"{config.vocab}; {config.batch} sequences ({config.tokens} tokens) per step in {config.microbatches} "
          f"micro-batches; Adam lr {config.lr}; {config.rounds} rounds of {config.steps} timed steps per run; "
          f"{os.cpu_count()} CPUs, one thread per rank")
    header = (f"{'stages':>6} {'schedule':<18} {'torch class':<30} {'ours tok/s':>10} {'torch tok/s':>11} "
              f"{'ratio':>6} {'ours MiB':>9} {'torch MiB':>9}")
    print(header)
    print("-" * len(header))
    split = split_over_fused(config)
    ratios, gap, lines = [], 0.0, []
    for world in stages:
        result = measure(world, config)
        for ours, theirs, chunks in runnable(world, config):
            rate = {f: config.tokens * config.steps / statistics.median(result["seconds"][(ours, f)])
                    for f in ("ours", "torch")}
            peak = {f: max(result["peaks"][(ours, f)]) / 2**20 for f in ("ours", "torch")}
            ratio = rate["ours"] / rate["torch"]
            ratios.append(ratio)
            gap = max(gap, *(abs(a - b) for a, b in zip(result["losses"][(ours, "ours")],
                                                        result["losses"][(ours, "torch")], strict=True)))
            label = f"{theirs} (v={chunks})"
            print(f"{world:>6} {ours:<18} {label:<30} {rate['ours']:>10.0f} {rate['torch']:>11.0f} {ratio:>6.3f} "
                  f"{peak['ours']:>9.1f} {peak['torch']:>9.1f}")
            name = f"pipeline_vs_torch.{world}stages.{ours}"
            lines += [f"RESULT {name}.ours_tokens_s={rate['ours']:.1f}",
                      f"RESULT {name}.torch_tokens_s={rate['torch']:.1f}", f"RESULT {name}.ratio={ratio:.3f}",
                      f"RESULT {name}.ours_peak_mib={peak['ours']:.1f}",
                      f"RESULT {name}.torch_peak_mib={peak['torch']:.1f}"]
            per_rank = " ".join(f"{a / 2**20:.0f}/{b / 2**20:.0f}" for a, b in
                                zip(result["peaks"][(ours, "ours")], result["peaks"][(ours, "torch")], strict=True))
            print(f"{'':>6} peak MiB per rank (ours/torch): {per_rank}")
    print()
    print("\n".join(lines))
    print(f"RESULT pipeline_vs_torch.min_ratio={min(ratios):.3f}")
    print(f"RESULT pipeline_vs_torch.loss_gap={gap:.2e}")
    print(f"RESULT pipeline_vs_torch.split_over_fused_backward={split:.3f}")


if __name__ == "__main__":
    main()

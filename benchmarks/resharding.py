"""Cross-mesh resharding: send_recv vs allgather vs broadcast (+ sender selection), and eager 1F1B vs 1F1B.

Measured side by side in one run on this one machine with both transports (payloads over gloo's TCP
loopback, and through shared memory with gloo carrying only signals: what ``reshard()`` picks on one
host), and every plan also timed in the topology cost model
(lightning_grendel.resharding.costmodel), where inter-host NICs are the bottleneck.
``executor="auto"`` with ``sender_mode="auto"`` (resharding/auto.py) chooses per layout and transport
by timing the candidates once; it is timed beside the fixed variants, and ``auto_vs_best_worst`` is
its median over the best fixed variant's, worst over the layouts.
The eager-vs-1F1B step time uses an emulated per-transfer latency (each send starts that much later
on the sender's outbox thread): an emulation of a slow link, not a measurement of one.

    python benchmarks/resharding.py            # full: 64 MiB tensors, 9 repeats (several minutes)
    python benchmarks/resharding.py --quick    # 1-to-m up to 4 receivers, 2 MiB, 1 repeat (under a minute)
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pipeline_schedules import median_step_seconds

from lightning_grendel.resharding import Mesh, make_plan
from lightning_grendel.resharding.auto import resolve_plan
from lightning_grendel.resharding.costmodel import Topology, plan_makespan, traffic
from lightning_grendel.resharding.executors import GroupCache, start_plan
from lightning_grendel.resharding.mesh import box_slices, local_box
from lightning_grendel.resharding.plan import default_hosts
from lightning_grendel.resharding.shm import SharedMemoryArenas
from lightning_grendel.resharding.tasks import box_shape

VARIANTS = [("send_recv", "normal"), ("allgather", "normal"), ("broadcast", "normal"),
            ("broadcast", "no_loadbalance"), ("broadcast", "loadbalance_size"), ("broadcast", "loadbalance_order")]
TRANSPORTS = ("dist", "shm")  # payloads over gloo TCP loopback / through shared memory


def _one_to_m(m: int) -> tuple:
    """One sender, m fully replicated receivers spread over 2 hosts (cost model)."""
    src, dst = Mesh([0], (1, 1)), Mesh(range(1, m + 1), (1, m))
    hosts = {0: 0, **{r: 1 + (i >= (m + 1) // 2) for i, r in enumerate(dst.ranks)}}
    return f"1-to-{m} RRR", src, "RRR", dst, "RRR", hosts


def _n_to_m() -> list[tuple]:
    """The paper's n-to-m suite scaled to 2x2 meshes (mesh rows are hosts in the cost model)."""
    a, b = Mesh(range(4), (2, 2)), Mesh(range(4, 8), (2, 2))
    cases = [("S0RR->S0RR", a, "S0RR", b, "S0RR"), ("RRR->S0RR", a, "RRR", b, "S0RR"),
             ("RS0R->S0RR", a, "RS0R", b, "S0RR"), ("RS01R->S01RR", a, "RS01R", b, "S01RR"),
             ("S1RR->S0RR", a, "S1RR", b, "S0RR"),
             ("S0RR->(3,1)S0RR misaligned", a, "S0RR", Mesh(range(4, 7), (3, 1)), "S0RR"),
             ("(1,2)S1RR->(2,2)RRR", Mesh([0, 1], (1, 2)), "S1RR", Mesh(range(2, 6), (2, 2)), "RRR"),
             ("RS0R->RRS0", a, "RS0R", b, "RRS0")]
    return [(name, src, s, dst, d, default_hosts(src, dst)) for name, src, s, dst, d in cases]


def _cases(quick: bool) -> list[tuple]:
    """Quick keeps the 1-to-m cases up to 4 receivers (5 processes), so it starts fast."""
    if quick:
        return [_one_to_m(m) for m in (1, 2, 4)]
    return [_one_to_m(m) for m in range(1, 7)] + _n_to_m()


def _world(quick: bool) -> int:
    return 1 + max(r for case in _cases(quick) for mesh in (case[1], case[3]) for r in mesh.ranks)


def _bench_rank(rank: int, world: int, init: str, quick: bool, mib: int, repeats: int, out: dict) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    shape = (256, 256, 4 * mib)
    full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    groups = GroupCache(600)
    arenas = SharedMemoryArenas()
    plans = {}
    for name, src, src_spec, dst, dst_spec, hosts in _cases(quick):
        for executor, mode in VARIANTS:
            plan = make_plan(shape, full.dtype, src, src_spec, dst, dst_spec, executor, mode, host_of=hosts)
            groups.ensure(plan.groups())
            plans[(name, executor, mode)] = plan
    auto = {}  # executor="auto", sender_mode="auto": chosen by timing on each transport (once per layout)
    for name, src, src_spec, dst, dst_spec, hosts in _cases(quick):
        for transport in TRANSPORTS:
            auto[(name, transport)] = resolve_plan(shape, full.dtype, src, src_spec, dst, dst_spec, "auto", "auto",
                                                   groups=groups, shm=arenas if transport == "shm" else None,
                                                   host_of=hosts)
            groups.ensure(auto[(name, transport)].groups())
    timings: dict[tuple, list[float]] = {(*key, t): [] for key in plans for t in TRANSPORTS}
    timings.update({(name, "auto", "auto", t): [] for name, t in auto})
    runs = [(transport, executor, mode) for transport in TRANSPORTS for executor, mode in [*VARIANTS, ("auto", "auto")]]
    for name, src, _, dst, _, _ in _cases(quick):
        specs = plans[(name, "send_recv", "normal")]
        local = buffer = None
        if rank in src.ranks:
            local = full[box_slices(local_box(src, specs.src_spec, shape, rank))].contiguous()
        if rank in dst.ranks:
            # Every variant receives into one pre-touched buffer: the transfer is timed, not the page faults
            # of a fresh 64 MiB allocation (a constant that would otherwise dominate small differences).
            buffer = torch.zeros(box_shape(local_box(dst, specs.dst_spec, shape, rank)))
        for repeat in range(repeats + 1):  # the first round warms up connections and buffers
            # A seeded shuffle per repeat (the same on every rank): no variant always runs at the same point.
            for transport, executor, mode in random.Random(repeat).sample(runs, len(runs)):
                plan = auto[(name, transport)] if executor == "auto" else plans[(name, executor, mode)]
                dist.barrier()
                start = time.perf_counter()
                result = start_plan(plan, rank, local, groups, shm=arenas if transport == "shm" else None,
                                    out=buffer).wait()
                elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                if repeat > 0:
                    timings[(name, executor, mode, transport)].append(float(elapsed))
                if repeat == 0 and result is not None:  # correctness of what was timed
                    want = full[box_slices(local_box(dst, plan.dst_spec, shape, rank))]
                    assert torch.equal(result, want), (name, executor, mode, transport)
                    result.zero_()
    if rank == 0:
        for (name, executor, mode), plan in plans.items():
            hosts = next(c[5] for c in _cases(quick) if c[0] == name)
            sent = traffic(plan, hosts)
            medians = [statistics.median(timings[(name, executor, mode, t)]) for t in TRANSPORTS]
            out[(name, executor, mode)] = (*medians, plan_makespan(plan, Topology(hosts)),
                                           sum(sent.values()), max(sent.values()))
        for (name, transport), plan in auto.items():
            chosen = next((f"{e}/{m}" for (n, e, m), fixed in plans.items() if n == name and fixed.ops == plan.ops),
                          f"{plan.executor}/other")
            out[("auto", name, transport)] = (statistics.median(timings[(name, "auto", "auto", transport)]), chosen)
    dist.barrier()
    arenas.close()
    dist.destroy_process_group()


def _pipeline_rank(rank: int, world: int, init: str, latency_s: float, steps: int, out: dict) -> None:
    from lightning_grendel.pipeline.examples.tiny_lm import TinyTransformerLM
    from lightning_grendel.pipeline.runtime import PipelineRuntime

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    torch.manual_seed(0)
    model = TinyTransformerLM(n_layers=4, stage_splits=[1, 2, 3])
    ids = torch.randint(0, 64, (16, 32))
    meshes = [Mesh([r], (1, 1)) for r in range(world)]
    runtimes = {name: PipelineRuntime(model.pipeline_stages(), meshes, schedule=name, num_microbatches=8,
                                      transfer_latency_s=latency_s) for name in ("1f1b", "eager_1f1b")}
    medians = median_step_seconds(runtimes, ids, ids, steps)
    if rank == 0:
        out.update(medians)
    dist.barrier()
    dist.destroy_process_group()


def spawn_ranks(fn, world: int, *args) -> dict:
    """``fn(rank, world, init_file, *args, out)`` on ``world`` spawned ranks; what they put in ``out``."""
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        out = manager.dict()
        mp.start_processes(fn, args=(world, os.path.join(tmp, "init"), *args, out), nprocs=world,
                           start_method="spawn")
        result = dict(out)
        manager.shutdown()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1-to-m cases up to 4 receivers, 2 MiB, 1 repeat")
    parser.add_argument("--mib", type=int, default=None, help="tensor size in MiB (default 64, quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 9, quick 1)")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="emulated per-transfer latency")
    args = parser.parse_args()
    mib = args.mib or (2 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 9)
    results = spawn_ranks(_bench_rank, _world(args.quick), args.quick, mib, repeats)

    print(f"\nResharding, float32 {mib} MiB on one machine ({os.cpu_count()} CPUs), median of {repeats}: payloads over "
          "gloo TCP loopback ('gloo') and through shared memory ('shm'); cost model: 12.5 GB/s NIC per host, "
          "100 GB/s inside a host")
    header = (f"{'case':<30} {'executor':<10} {'senders':<17} {'gloo ms':>8} {'vs s/r':>7} {'shm ms':>8} "
              f"{'vs s/r':>7} {'model ms':>9} {'vs s/r':>7} {'total MiB':>9} {'max/rank MiB':>12}")
    print(header)
    print("-" * len(header))
    worst = {t: 0.0 for t in TRANSPORTS}
    for name, *_ in _cases(args.quick):
        base = results[(name, "send_recv", "normal")]
        for executor, mode in VARIANTS:
            row = results[(name, executor, mode)]
            gloo, shm, model, total, peak = row
            print(f"{name:<30} {executor:<10} {mode:<17} {gloo * 1e3:>8.1f} {base[0] / gloo:>6.2f}x "
                  f"{shm * 1e3:>8.1f} {base[1] / shm:>6.2f}x {model * 1e3:>9.2f} {base[2] / model:>6.2f}x "
                  f"{total / 2**20:>9.0f} {peak / 2**20:>12.0f}")
            if (executor, mode) == ("broadcast", "normal"):
                worst = {t: max(worst[t], row[i] / base[i]) for i, t in enumerate(TRANSPORTS)}
    pipeline = spawn_ranks(_pipeline_rank, 4, args.latency_ms / 1e3, 1 if args.quick else 5)
    print(f"\nPipeline step, TinyTransformerLM, 4 stages x 1 rank, 8 micro-batches, emulated transfer latency "
          f"{args.latency_ms:.0f} ms: 1F1B {pipeline['1f1b'] * 1e3:.0f} ms, eager 1F1B "
          f"{pipeline['eager_1f1b'] * 1e3:.0f} ms\n")
    one_to_four = "1-to-4 RRR"
    send_recv, broadcast = results[(one_to_four, "send_recv", "normal")], results[(one_to_four, "broadcast", "normal")]
    print(f"gloo TCP loopback (for comparison): 1-to-4 broadcast {send_recv[0] / broadcast[0]:.3f}x send_recv, "
          f"worst broadcast / send_recv {worst['dist']:.3f}")
    print(f"RESULT resharding.broadcast_speedup_1to4={send_recv[1] / broadcast[1]:.3f}")
    print(f"RESULT resharding.model_speedup_1to4={send_recv[2] / broadcast[2]:.3f}")
    print(f"RESULT resharding.worst_broadcast_ratio={worst['shm']:.3f}")
    print("\nexecutor='auto', sender_mode='auto' (chosen once per layout by timing the candidates on the transport): "
          "its median over the best fixed variant's median")
    auto_worst = {t: 0.0 for t in TRANSPORTS}
    for name, *_ in _cases(args.quick):
        parts = []
        for i, transport in enumerate(TRANSPORTS):
            seconds, chosen = results[("auto", name, transport)]
            best = min(results[(name, executor, mode)][i] for executor, mode in VARIANTS)
            auto_worst[transport] = max(auto_worst[transport], seconds / best)
            parts.append(f"{'gloo' if transport == 'dist' else transport}: {chosen} {seconds / best:.3f}")
        print(f"{name:<30} " + "   ".join(parts))
    print(f"RESULT resharding.auto_vs_best_worst_gloo={auto_worst['dist']:.3f}")
    print(f"RESULT resharding.auto_vs_best_worst_shm={auto_worst['shm']:.3f}")
    print(f"RESULT resharding.auto_vs_best_worst={max(auto_worst.values()):.3f}")
    print(f"RESULT pipeline.eager_vs_1f1b={pipeline['1f1b'] / pipeline['eager_1f1b']:.3f}")


if __name__ == "__main__":
    main()

"""Resharding over a slow link between two hosts on one machine, and Grendel's exchange at Rubble scale.

Two network namespaces joined by a veth pair (``lightning_grendel/_two_hosts.py``; needs root), the
link shaped with ``tc tbf`` to ``--mbit`` in both directions, so the link and not memcpy is the
bottleneck. Host 0 holds ranks 0 and 1, host 1 ranks 2..5; every case runs with the arenas
``reshard(transport="auto")`` uses (shared memory inside a host, gloo across, broadcasts entering
each host once). Every case's median time is printed next to the topology cost model's prediction
(``lightning_grendel/resharding/costmodel.py``) whose inter-host bandwidth is fitted from ONE
calibration transfer (a single cross-host send of the payload, before the cases); the intra-host
bandwidth stays the model's default.

    sudo python benchmarks/two_hosts.py                 # 8 MiB at 1000 Mbit/s, 5 repeats (about a minute)
    python benchmarks/two_hosts.py --capacity-only      # only the Rubble-scale estimate (no namespaces)

The capacity estimate (``capacity_rows``) needs no namespaces: see its docstring for its inputs.
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

from lightning_grendel._two_hosts import TwoHosts, unavailable_reason
from lightning_grendel.resharding import Mesh, make_plan
from lightning_grendel.resharding.costmodel import Topology, plan_makespan
from lightning_grendel.resharding.executors import GroupCache, start_plan
from lightning_grendel.resharding.mesh import box_slices, local_box
from lightning_grendel.resharding.shm import SharedMemoryArenas
from lightning_grendel.resharding.tasks import box_shape
from lightning_grendel.splatting.grendel.renderer import PAYLOAD

RANKS_PER_HOST = (2, 4)
HOST_OF = {r: 0 if r < RANKS_PER_HOST[0] else 1 for r in range(sum(RANKS_PER_HOST))}
EXECUTORS = ("send_recv", "broadcast")


def _cases() -> list[tuple[str, Mesh, str, Mesh, str]]:
    """1 -> m replicated receivers on the other host, a 1 -> 4 split over both hosts, and 2 -> 2 rows."""
    remote = [(f"1-to-{m} remote", Mesh([0], (1, 1)), "RR", Mesh(range(2, 2 + m), (1, m)), "RR") for m in (1, 2, 4)]
    return remote + [("1-to-4 over both hosts", Mesh([0], (1, 1)), "RR", Mesh([1, 2, 3, 4], (1, 4)), "RR"),
                     ("2-to-2 S0R->RR", Mesh([0, 1], (2, 1)), "S0R", Mesh([2, 3], (1, 2)), "RR")]


def _shape(mib: int) -> tuple[int, int]:
    return (256, 1024 * mib)


def _timed(plan, rank: int, local, groups: GroupCache, arenas: SharedMemoryArenas, buffer) -> tuple[float, object]:
    dist.barrier()
    start = time.perf_counter()
    result = start_plan(plan, rank, local, groups, shm=arenas, out=buffer).wait()
    elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed), result


def _bench_rank(rank: int, world: int, mib: int, repeats: int) -> dict:
    """Every rank: the calibration transfer, then each case x executor ``repeats`` times (plus a warm-up)."""
    shape = _shape(mib)
    full = torch.arange(shape[0] * shape[1], dtype=torch.float32).reshape(shape)
    groups, arenas = GroupCache(300), SharedMemoryArenas()
    cases = {name: {e: make_plan(shape, full.dtype, src, s, dst, d, e, host_of=HOST_OF) for e in EXECUTORS}
             for name, src, s, dst, d in _cases()}
    calibration = make_plan(shape, full.dtype, Mesh([0], (1, 1)), "RR", Mesh([2], (1, 1)), "RR", "send_recv",
                            host_of=HOST_OF)
    for plan in [calibration, *(p for plans in cases.values() for p in plans.values())]:
        groups.ensure(plan.groups())
    buffer = torch.zeros(shape) if rank == 2 else None
    _timed(calibration, rank, full if rank == 0 else None, groups, arenas, buffer)  # warm-up: connections
    seconds, _ = _timed(calibration, rank, full if rank == 0 else None, groups, arenas, buffer)
    report: dict = {"calibration_s": seconds, "times": {}}
    for name, src, _, dst, _ in _cases():
        first = cases[name]["send_recv"]
        local = full[box_slices(local_box(src, first.src_spec, shape, rank))].contiguous() if rank in src.ranks \
            else None
        out = torch.zeros(box_shape(local_box(dst, first.dst_spec, shape, rank))) if rank in dst.ranks else None
        for executor in EXECUTORS:
            times = []
            for repeat in range(repeats + 1):
                elapsed, result = _timed(cases[name][executor], rank, local, groups, arenas, out)
                if repeat == 0 and result is not None:  # what is timed is also right
                    want = full[box_slices(local_box(dst, first.dst_spec, shape, rank))]
                    assert torch.equal(result, want), (name, executor, rank)
                    result.zero_()
                elif repeat > 0:
                    times.append(elapsed)
            report["times"][f"{name}|{executor}"] = statistics.median(times)
    dist.barrier()
    arenas.close()
    return report


def predictions(mib: int, inter_host_bw: float) -> dict[str, float]:
    """The cost model's seconds for every case and executor at the given inter-host bandwidth (bytes/s)."""
    shape, topology = _shape(mib), Topology(HOST_OF, inter_host_bw=inter_host_bw)
    return {f"{name}|{e}": plan_makespan(make_plan(shape, torch.float32, src, s, dst, d, e, host_of=HOST_OF),
                                         topology)
            for name, src, s, dst, d in _cases() for e in EXECUTORS}


# --- Grendel's exchange at Rubble scale: an estimate from measured inputs ------------------------------

MEASURED_RATIO = {2: 0.561, 4: 0.343}  # sparse/dense bytes, docs/results/grendel_exchange.md (b = 1)
SPLAT_BYTES = PAYLOAD * 4  # float32 columns per splat sent, without the 2 optional absgrad columns


def fitted_visibility_and_height() -> tuple[float, float]:
    """Fit ``ratio(W) = v (1 + h W) / W`` to the two measured sparse/dense ratios.

    A Gaussian is sent by its owner to every other rank whose pixel strip its footprint touches: with
    a fraction ``v`` of the Gaussians in view and footprints ``h`` of the image height, it touches about
    ``1 + h W`` of W strips; ``(W - 1) / W`` of those are remote; dense sends it to all ``W - 1``.
    """
    (w1, r1), (w2, r2) = sorted(MEASURED_RATIO.items())
    vh = (r2 * w2 - r1 * w1) / (w2 - w1)
    v = r1 * w1 - vh * w1
    return v, vh / v


def capacity_rows(links_gbit: tuple[float, ...] = (100, 400), gaussians: float = 40e6, gpus_per_node: int = 8,
                  nvlink_bytes_s: float = 450e9, scenarios: dict[str, tuple[float, float]] | None = None) -> list[dict]:
    """Exchange time per image (forward splats + the same rows' gradients back) at W GPUs and a NIC speed.

    Per image, rank bytes sent = ``gaussians / W * v (1 + h W) (W - 1) / W * SPLAT_BYTES``; a share
    ``(W - G) / (W - 1)`` of each rank's peers is on other nodes (G GPUs per node, peers uniform), so
    a node's NIC carries G ranks' cross-node bytes, and NVLink each GPU's in-node bytes. Time is the
    slower of the two, x2 for the backward. An estimate: ``v`` and ``h`` come from the fit below or
    are assumed; the payload layout is this project's, not the paper's.
    """
    measured = fitted_visibility_and_height()
    scenarios = scenarios or {"fit to our Blender runs": measured, "assumed aerial (v=0.2, h=0.02)": (0.2, 0.02)}
    rows = []
    for label, (v, h) in scenarios.items():
        for world in (16, 32):
            per_rank = gaussians / world * v * (1 + h * world) * (world - 1) / world * SPLAT_BYTES
            remote = (world - gpus_per_node) / (world - 1)
            for gbit in links_gbit:
                nic_s = gpus_per_node * per_rank * remote / (gbit * 1e9 / 8)
                nvlink_s = per_rank * (1 - remote) / nvlink_bytes_s
                rows.append({"scenario": label, "W": world, "Gbit/s": gbit, "v": v, "h": h,
                             "MiB/rank/image": per_rank / 2**20, "ms/image": 2e3 * max(nic_s, nvlink_s)})
    return rows


def print_capacity(links_gbit: tuple[float, ...] = (100, 400)) -> None:
    v, h = fitted_visibility_and_height()
    print(f"\nGrendel exchange at Rubble scale (estimate): 40M Gaussians, 8 GPUs per node, NVLink 450 GB/s per GPU; "
          f"fit to measured sparse/dense {MEASURED_RATIO}: v={v:.3f}, h={h:.3f}")
    header = f"{'scenario':<32} {'W':>3} {'Gbit/s':>6} {'MiB/rank/image':>15} {'ms/image':>9}"
    print(header)
    print("-" * len(header))
    for row in capacity_rows(links_gbit):
        print(f"{row['scenario']:<32} {row['W']:>3} {row['Gbit/s']:>6.3g} {row['MiB/rank/image']:>15.1f} "
              f"{row['ms/image']:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=8, help="payload per case in MiB (default 8)")
    parser.add_argument("--mbit", type=float, default=1000.0, help="link rate in Mbit/s, both directions")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per case and executor")
    parser.add_argument("--capacity-only", action="store_true", help="print only the Rubble-scale estimate")
    args = parser.parse_args()
    if args.capacity_only:
        print_capacity()
        return
    reason = unavailable_reason()
    if reason is not None:
        sys.exit(f"two hosts need network namespaces here: {reason}")
    os.chdir(Path(__file__).resolve().parents[1])  # the ranks import benchmarks.two_hosts from the repository
    with TwoHosts() as hosts:
        hosts.shape(args.mbit)
        reports = hosts.run("benchmarks.two_hosts:_bench_rank", RANKS_PER_HOST, timeout_s=300, mib=args.mib,
                            repeats=args.repeats)
    measured, payload = reports[0]["times"], _shape(args.mib)[0] * _shape(args.mib)[1] * 4
    bandwidth = payload / reports[0]["calibration_s"]
    model = predictions(args.mib, bandwidth)
    print(f"\nResharding across 2 namespace hosts (ranks {RANKS_PER_HOST}), veth shaped to {args.mbit:.0f} Mbit/s "
          f"(tbf), float32 {args.mib} MiB, median of {args.repeats}; calibration: one cross-host send of the "
          f"payload, {bandwidth * 8 / 1e6:.0f} Mbit/s")
    header = f"{'case':<24} {'executor':<10} {'measured ms':>11} {'model ms':>9} {'error':>7} {'bcast/sr':>9}"
    print(header)
    print("-" * len(header))
    errors, ratios = [], []
    for name, *_ in _cases():
        for executor in EXECUTORS:
            key = f"{name}|{executor}"
            error = abs(model[key] - measured[key]) / measured[key]
            errors.append(error)
            ratio = measured[f"{name}|broadcast"] / measured[f"{name}|send_recv"]
            if executor == "broadcast":
                ratios.append(ratio)
            print(f"{name:<24} {executor:<10} {measured[key] * 1e3:>11.1f} {model[key] * 1e3:>9.1f} "
                  f"{error:>6.1%} {ratio if executor == 'broadcast' else 1.0:>9.3f}")
    print_capacity((100, 400, bandwidth * 8 / 1e9))  # and at the link measured here
    speedup = measured["1-to-4 remote|send_recv"] / measured["1-to-4 remote|broadcast"]
    print(f"\nRESULT two_hosts.link_mbit={bandwidth * 8 / 1e6:.1f}")
    print(f"RESULT two_hosts.broadcast_speedup_1to4={speedup:.3f}")
    print(f"RESULT two_hosts.worst_broadcast_ratio={max(ratios):.3f}")
    print(f"RESULT two_hosts.model_error_max={max(errors):.3f}")


if __name__ == "__main__":
    main()

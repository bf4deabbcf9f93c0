"""A topology cost model for resharding plans: where broadcast-based resharding pays off.

On one machine over loopback the links are not the bottleneck, so plans are also timed in a model
of a cluster: hosts with one NIC (bandwidth ``inter_host_bw``, separate egress and ingress) shared by
their devices, faster links inside a host. A broadcast is a pipelined chain along its group (sender's
host first, each host entered once), so its time is ``bytes / slowest link``; an all-gather is a
ring. Operations run in plan order, each as soon as every device and NIC it uses is free (a device
runs one transfer at a time, like a communication stream); a new round waits for the previous one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lightning_grendel.resharding.plan import Broadcast, Gather, ReshardPlan, Send


@dataclass(frozen=True)
class Topology:
    host_of: Mapping[int, int]
    inter_host_bw: float = 12.5e9
    intra_host_bw: float = 100e9


def _host_order(ranks: Sequence[int], host_of: Mapping[int, int]) -> list[int]:
    """Sender first, then the rest grouped by host in order of first appearance (sender's host first)."""
    hosts: list[int] = []
    for rank in ranks:
        if host_of[rank] not in hosts:
            hosts.append(host_of[rank])
    head, rest = ranks[0], list(ranks[1:])
    return [head] + sorted(rest, key=lambda r: (hosts.index(host_of[r]), ranks.index(r)))


def _links(chain: Sequence[int], topology: Topology, ring: bool) -> tuple[float, set[tuple[str, int]]]:
    """Slowest link bandwidth along a chain (or ring) and the NIC directions it occupies."""
    pairs = list(zip(chain, chain[1:], strict=False)) + ([(chain[-1], chain[0])] if ring and len(chain) > 2 else [])
    bandwidth = float("inf")
    nics: set[tuple[str, int]] = set()
    for a, b in pairs:
        ha, hb = topology.host_of[a], topology.host_of[b]
        if ha != hb:
            bandwidth = min(bandwidth, topology.inter_host_bw)
            nics.update({("out", ha), ("in", hb)})
        else:
            bandwidth = min(bandwidth, topology.intra_host_bw)
    return bandwidth, nics


def plan_makespan(plan: ReshardPlan, topology: Topology) -> float:
    """Seconds the plan takes in the model."""
    free: dict[tuple[str, int], float] = {}
    round_start, round_end, current = 0.0, 0.0, None
    for op in plan.ops:
        if op.round != current:
            round_start, current = round_end, op.round
        nbytes = plan.op_bytes(op)
        if isinstance(op, Send):
            chain, ring, volume = [op.sender, op.receiver], False, nbytes
        elif isinstance(op, Broadcast):
            chain, ring, volume = _host_order(op.ranks, topology.host_of), False, nbytes
        else:
            chain, ring, volume = _host_order(op.ranks, topology.host_of), True, nbytes * (len(op.ranks) - 1)
        bandwidth, nics = _links(chain, topology, ring)
        resources = {("dev", r) for r in chain} | nics
        start = max([round_start, *(free.get(res, 0.0) for res in resources)])
        end = start + volume / bandwidth
        for res in resources:
            free[res] = end
        round_end = max(round_end, end)
    return round_end


def traffic(plan: ReshardPlan, host_of: Mapping[int, int]) -> dict[int, int]:
    """Bytes each rank sends: p2p payloads, chain forwarding for broadcasts, ring shares for gathers."""
    sent: dict[int, int] = {}
    for op in plan.ops:
        nbytes = plan.op_bytes(op)
        if isinstance(op, Send):
            sent[op.sender] = sent.get(op.sender, 0) + nbytes
        elif isinstance(op, Broadcast):
            for rank in _host_order(op.ranks, host_of)[:-1]:
                sent[rank] = sent.get(rank, 0) + nbytes
        elif isinstance(op, Gather):
            for rank in op.ranks:
                sent[rank] = sent.get(rank, 0) + nbytes * (len(op.ranks) - 1)
    return sent

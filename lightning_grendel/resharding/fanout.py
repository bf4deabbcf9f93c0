"""Broadcasts that follow host boundaries: the payload enters each host once, then spreads in memory.

gloo's broadcast is a binomial tree over the group's ranks that does not know about hosts: from a
sender on one host to four receivers on another, the root alone sends three copies over the link.
When the ranks' hosts are known (the shared-memory arenas exchange them), a broadcast spanning hosts
runs as point-to-point sends of one copy per host, in a binomial tree over one leader per host (the
sender on its own host, the first receiver elsewhere); each leader then hands the payload to the
other receivers on its host through its shared-memory arena. On two hosts that is one copy over the
link, the cost model's chain (``costmodel.py``); on more hosts it takes ``ceil(log2 hosts)`` copy
times, where the model assumes a pipelined chain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Fanout:
    """Who receives from whom: across hosts between leaders, and inside a host from its leader."""

    parent: dict[int, int]  # leader -> the leader it receives the payload from (the sender has none)
    children: dict[int, tuple[int, ...]]  # leader -> the leaders it forwards the payload to
    local: dict[int, tuple[int, ...]]  # leader -> the other ranks on its host, which read its arena slot


def ranks_by_host(ranks: Sequence[int], hosts: Sequence[str]) -> dict[str, list[int]]:
    """``ranks`` grouped by ``hosts[rank]``, hosts in order of their first rank, ranks in the given order."""
    by_host: dict[str, list[int]] = {}
    for rank in ranks:
        by_host.setdefault(hosts[rank], []).append(rank)
    return by_host


def fanout(ranks: Sequence[int], hosts: Sequence[str]) -> Fanout | None:
    """The routes of a broadcast over ``ranks`` (``ranks[0]`` sends); None when they share one host."""
    by_host = ranks_by_host(ranks, hosts)
    if len(by_host) == 1:
        return None
    leaders = [members[0] for members in by_host.values()]  # the sender's host comes first
    parent: dict[int, int] = {}
    children: dict[int, list[int]] = {leader: [] for leader in leaders}
    for j in range(1, len(leaders)):  # binomial tree: leader j hears from j minus its highest power of two
        source = leaders[j - (1 << (j.bit_length() - 1))]
        parent[leaders[j]] = source
        children[source].append(leaders[j])
    return Fanout(parent, {k: tuple(v) for k, v in children.items()},
                  {members[0]: tuple(members[1:]) for members in by_host.values()})

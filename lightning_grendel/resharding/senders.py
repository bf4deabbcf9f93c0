"""Sender selection for unit transfers: which replica sends, and (for ``loadbalance_order``) in which round.

Pure functions of their inputs, so every rank derives the same assignment without talking; the only
randomness (``loadbalance_order``) comes from a seeded generator.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

FixedSenderMode = Literal["normal", "no_loadbalance", "loadbalance_size", "loadbalance_order"]
SENDER_MODES: tuple[FixedSenderMode, ...] = get_args(FixedSenderMode)
SenderMode = Literal["auto", "normal", "no_loadbalance", "loadbalance_size", "loadbalance_order"]  # auto: auto.py


@dataclass(frozen=True)
class Transfer:
    """A payload of ``nbytes`` that one of ``candidates`` must deliver to all of ``receivers``."""

    nbytes: int
    candidates: tuple[int, ...]
    receivers: tuple[int, ...]


@dataclass(frozen=True)
class Assignment:
    """Transfer ``index`` is sent by ``sender`` in ``round`` (rounds run one after another)."""

    round: int
    index: int
    sender: int


def check_sender_mode(sender_mode: str, allow_auto: bool = True) -> None:
    """Raise ``ValueError`` naming the choices if ``sender_mode`` is neither ``auto`` nor one of :data:`SENDER_MODES`.

    ``auto`` is chosen by timing on a process group (``auto.py``); selecting senders needs a fixed mode.
    """
    if sender_mode == "auto" and not allow_auto:
        raise ValueError(f"sender_mode='auto' is chosen on a process group (reshard(), PipelineRuntime or "
                         f"resharding.auto.resolve_plan); a plan needs one of {SENDER_MODES}")
    if sender_mode != "auto" and sender_mode not in SENDER_MODES:
        raise ValueError(f"unknown sender_mode {sender_mode!r}; choose 'auto' or one of {SENDER_MODES}")


def select_senders(transfers: Sequence[Transfer], sender_mode: FixedSenderMode = "normal", *,
                   host_of: Mapping[int, int] | None = None, seed: int = 0, trials: int = 100,
                   loads: MutableMapping[int, int] | None = None) -> list[Assignment]:
    """Choose a sender per transfer. ``loads`` (bytes per rank) is updated, so it can span several plans."""
    check_sender_mode(sender_mode, allow_auto=False)
    loads = loads if loads is not None else {}
    if sender_mode == "loadbalance_order":
        return _order_rounds(transfers, loads, random.Random(seed), trials)
    assignments = []
    for index, transfer in enumerate(transfers):
        if sender_mode == "no_loadbalance":
            sender = transfer.candidates[0]
        elif sender_mode == "normal":
            sender = min(transfer.candidates, key=lambda r: loads.get(r, 0))
        else:
            sender = _host_aware(transfer.candidates, loads, host_of or {})
        loads[sender] = loads.get(sender, 0) + transfer.nbytes
        assignments.append(Assignment(0, index, sender))
    return assignments


def _host_aware(candidates: Sequence[int], loads: Mapping[int, int], host_of: Mapping[int, int]) -> int:
    """Least-loaded host first (its devices share one NIC), then least-loaded device on it."""
    host_load: dict[int, int] = {}
    for rank, load in loads.items():
        host = host_of.get(rank, rank)
        host_load[host] = host_load.get(host, 0) + load
    return min(candidates, key=lambda r: (host_load.get(host_of.get(r, r), 0), loads.get(r, 0)))


def _order_rounds(transfers: Sequence[Transfer], loads: MutableMapping[int, int], rng: random.Random,
                  trials: int) -> list[Assignment]:
    """Greedy rounds of concurrent transfers with disjoint participants, best of ``trials`` random packings."""
    remaining = list(range(len(transfers)))
    assignments: list[Assignment] = []
    round_index = 0
    while remaining:
        best: list[tuple[int, int]] = []
        best_spread = float("inf")
        for _ in range(trials):
            order = rng.sample(remaining, len(remaining))
            busy: set[int] = set()
            packed: list[tuple[int, int]] = []
            for index in order:
                transfer = transfers[index]
                if busy.intersection(transfer.receivers):
                    continue
                free = [r for r in transfer.candidates if r not in busy]
                if not free:
                    continue
                top = max(loads.get(r, 0) for r in free)
                weights = [top - loads.get(r, 0) + 1 for r in free]
                sender = rng.choices(free, weights=weights)[0]
                busy.add(sender)
                busy.update(transfer.receivers)
                packed.append((index, sender))
            trial_loads = dict(loads)
            for index, sender in packed:
                trial_loads[sender] = trial_loads.get(sender, 0) + transfers[index].nbytes
            spread = statistics.pstdev(trial_loads.values()) if len(trial_loads) > 1 else 0.0
            if len(packed) > len(best) or (len(packed) == len(best) and spread < best_spread):
                best, best_spread = packed, spread
        for index, sender in sorted(best):
            loads[sender] = loads.get(sender, 0) + transfers[index].nbytes
            assignments.append(Assignment(round_index, index, sender))
            remaining.remove(index)
        round_index += 1
    return assignments

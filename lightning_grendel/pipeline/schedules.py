"""Pipeline schedules: per-stage action orders, and the clock table they produce.

A schedule is, for each stage, an order of forward/backward actions over micro-batches (pipeline
flush: every backward of a step finishes before the optimiser step). The clock table replays those
orders with stage dependencies and an optional transfer latency, so warm-up counts, in-flight
activations and bubbles can be checked without running a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Schedule = Literal["gpipe", "1f1b", "eager_1f1b"]
SCHEDULES: tuple[Schedule, ...] = get_args(Schedule)


@dataclass(frozen=True)
class Action:
    """``kind`` is ``"F"`` or ``"B"``; ``microbatch`` counts from 0."""

    kind: str
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}"


def check_schedule(name: str) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {SCHEDULES}")


def warmup_forwards(name: str, stage: int, num_stages: int, num_microbatches: int) -> int:
    """Forwards a stage runs before its first backward: GPipe all, 1F1B S-s-1, eager 1F1B 2(S-s)-1."""
    check_schedule(name)
    if name == "gpipe":
        return num_microbatches
    if name == "1f1b":
        return min(num_microbatches, num_stages - stage - 1)
    return min(num_microbatches, 2 * (num_stages - stage) - 1)


def stage_order(name: str, stage: int, num_stages: int, num_microbatches: int) -> list[Action]:
    """Actions of one stage. 1F1B alternates F then B after warm-up; eager 1F1B alternates B then F."""
    if not 0 <= stage < num_stages or num_microbatches < 1:
        raise ValueError(f"need 0 <= stage < num_stages and num_microbatches >= 1, got {stage}, {num_stages}, "
                         f"{num_microbatches}")
    warmup = warmup_forwards(name, stage, num_stages, num_microbatches)
    forwards = [Action("F", m) for m in range(num_microbatches)]
    backwards = [Action("B", m) for m in range(num_microbatches)]
    order = forwards[:warmup]
    rest_f, rest_b = forwards[warmup:], backwards
    first, second = (rest_f, rest_b) if name == "1f1b" else (rest_b, rest_f)
    while rest_f or rest_b:
        for queue in (first, second):
            if queue:
                order.append(queue.pop(0))
    return order


@dataclass(frozen=True)
class Slot:
    stage: int
    action: Action
    start: float
    end: float


def clock_table(name: str, num_stages: int, num_microbatches: int, *, forward_time: float = 1.0,
                backward_time: float = 1.0, latency: float = 0.0) -> list[Slot]:
    """Replay every stage's order: F(s,m) waits for F(s-1,m) plus ``latency``, B(s,m) for B(s+1,m)."""
    orders = [stage_order(name, s, num_stages, num_microbatches) for s in range(num_stages)]
    done: dict[tuple[int, str, int], float] = {}
    free = [0.0] * num_stages
    position = [0] * num_stages
    slots: list[Slot] = []
    while any(position[s] < len(orders[s]) for s in range(num_stages)):
        progressed = False
        for s in range(num_stages):
            if position[s] == len(orders[s]):
                continue
            action = orders[s][position[s]]
            if action.kind == "F":
                dependency = (s - 1, "F", action.microbatch) if s > 0 else None
            else:
                dependency = (s + 1, "B", action.microbatch) if s < num_stages - 1 else (s, "F", action.microbatch)
            if dependency is not None and dependency not in done:
                continue
            ready = 0.0 if dependency is None else done[dependency] + (latency if dependency[0] != s else 0.0)
            start = max(free[s], ready)
            end = start + (forward_time if action.kind == "F" else backward_time)
            done[(s, action.kind, action.microbatch)] = end
            free[s] = end
            position[s] += 1
            slots.append(Slot(s, action, start, end))
            progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {name!r} deadlocks")
    return sorted(slots, key=lambda slot: (slot.start, slot.stage))


def makespan(slots: list[Slot]) -> float:
    return max(slot.end for slot in slots)


def peak_in_flight(name: str, stage: int, num_stages: int, num_microbatches: int) -> int:
    """Most activations a stage holds at once (forwards done whose backward has not run)."""
    held = peak = 0
    for action in stage_order(name, stage, num_stages, num_microbatches):
        held += 1 if action.kind == "F" else -1
        peak = max(peak, held)
    return peak


def render(slots: list[Slot], num_stages: int) -> str:
    """Text clock table (one row per stage), for logs and the docs."""
    times = sorted({slot.start for slot in slots})
    rows = []
    for s in range(num_stages):
        cells = {slot.start: str(slot.action) for slot in slots if slot.stage == s}
        rows.append(f"stage {s}: " + " ".join(f"{cells.get(t, '.'):>3}" for t in times))
    return "\n".join(rows)

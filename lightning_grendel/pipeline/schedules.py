"""Pipeline schedules by name, and the clock table their per-rank orders produce.

A schedule gives each rank an order of forward (``F``), backward (``B``) and, where the backward is
split, weight-gradient (``W``) actions over micro-batches and model chunks (pipeline flush: every
backward of a step finishes before the optimiser step). The clock table replays those orders with
the chunk dependencies and an optional transfer latency, so warm-up counts, held activations and
bubbles can be checked without running a model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, get_args

from lightning_grendel.pipeline.schedule_orders import (
    Action,
    eager_interleaved_order,
    eager_one_f_one_b_order,
    gpipe_order,
    interleaved_order,
    one_f_one_b_order,
    zb_h1_order,
)
from lightning_grendel.pipeline.v_schedule_orders import dualpipev_order, v_stage, zbv_order

Schedule = Literal["gpipe", "1f1b", "eager_1f1b", "interleaved_1f1b", "eager_interleaved_1f1b",
                   "zb_h1", "zbv", "dualpipev"]
Placement = Literal["loop", "v"]


@dataclass(frozen=True)
class PipelineSchedule:
    """``order(rank, num_ranks, num_microbatches, virtual_stages)``; ``virtual``: takes ``v > 1`` chunks
    per rank; ``split_backward``: ``B`` is the input gradient only and ``W`` the weight gradient;
    ``placement``: ``loop`` puts chunk ``c`` on mesh ``c mod S``, ``v`` runs exactly two chunks per
    mesh in a V (chunk ``c`` on mesh ``c``, then ``2S-1-c``); ``min_rounds``: at least that many
    micro-batches per stage mesh."""

    order: Callable[[int, int, int, int], list[Action]]
    virtual: bool = False
    split_backward: bool = False
    placement: Placement = "loop"
    min_rounds: int = 0


SCHEDULES: Mapping[str, PipelineSchedule] = MappingProxyType({
    "gpipe": PipelineSchedule(gpipe_order),
    "1f1b": PipelineSchedule(one_f_one_b_order),
    "eager_1f1b": PipelineSchedule(eager_one_f_one_b_order),
    "interleaved_1f1b": PipelineSchedule(interleaved_order, virtual=True),
    "eager_interleaved_1f1b": PipelineSchedule(eager_interleaved_order, virtual=True),
    "zb_h1": PipelineSchedule(zb_h1_order, split_backward=True),
    "zbv": PipelineSchedule(zbv_order, virtual=True, split_backward=True, placement="v"),
    "dualpipev": PipelineSchedule(dualpipev_order, virtual=True, split_backward=True, placement="v", min_rounds=2),
})
assert set(SCHEDULES) == set(get_args(Schedule))


def check_schedule(name: str, virtual_stages: int = 1) -> PipelineSchedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {tuple(SCHEDULES)}")
    schedule = SCHEDULES[name]
    if virtual_stages < 1:
        raise ValueError(f"virtual_stages must be >= 1, got {virtual_stages}")
    if virtual_stages > 1 and not schedule.virtual:
        virtual = tuple(n for n, s in SCHEDULES.items() if s.virtual)
        raise ValueError(f"schedule {name!r} runs one chunk per stage mesh; virtual_stages={virtual_stages} "
                         f"needs one of {virtual}")
    if schedule.placement == "v" and virtual_stages != 2:
        raise ValueError(f"schedule {name!r} runs two chunks per stage mesh in a V: virtual_stages must be 2, got "
                         f"{virtual_stages}")
    return schedule


def chunk_stages(name: str, num_stages: int, virtual_stages: int = 1) -> list[int]:
    """The stage mesh of every chunk under the schedule's placement."""
    schedule = check_schedule(name, virtual_stages)
    chunks = range(num_stages * virtual_stages)
    if schedule.placement == "v":
        return [v_stage(c, num_stages) for c in chunks]
    return [c % num_stages for c in chunks]


def boundary_lanes(name: str, num_stages: int, virtual_stages: int = 1) -> list[int]:
    """Per chunk boundary, which transfer lane of its direction it takes (lanes send in FIFO order).

    A send completes only once its receiver takes it, so a lane's messages must leave in the order
    they are wanted. Under a V a mesh sends both down the V (to the next mesh) and back up it (to the
    previous one), and one FIFO for both deadlocks ZBV from 4 meshes on: each half of the V gets its own.
    """
    placement = check_schedule(name, virtual_stages).placement
    return [int(placement == "v" and c >= num_stages) for c in range(num_stages * virtual_stages - 1)]


def stage_order(name: str, stage: int, num_stages: int, num_microbatches: int,
                virtual_stages: int = 1) -> list[Action]:
    """Actions of the rank group running stage mesh ``stage``, in the order it runs them."""
    schedule = check_schedule(name, virtual_stages)
    if not 0 <= stage < num_stages or num_microbatches < 1:
        raise ValueError(f"need 0 <= stage < num_stages and num_microbatches >= 1, got {stage}, {num_stages}, "
                         f"{num_microbatches}")
    if num_microbatches < schedule.min_rounds * num_stages:
        raise ValueError(f"schedule {name!r} needs num_microbatches >= {schedule.min_rounds} x the {num_stages} stage "
                         f"meshes (one per chunk), got {num_microbatches}")
    if schedule.virtual and schedule.placement == "loop" and num_microbatches % num_stages:
        raise ValueError(f"schedule {name!r} runs micro-batches in rounds of one per stage mesh: num_microbatches "
                         f"({num_microbatches}) must be a multiple of the {num_stages} stage meshes")
    return schedule.order(stage, num_stages, num_microbatches, virtual_stages)


@dataclass(frozen=True)
class Slot:
    stage: int
    action: Action
    start: float
    end: float


def _dependency(action: Action, split: bool, num_chunks: int) -> tuple[str, int, int] | None:
    """The action that must finish first: the previous chunk's forward, the next chunk's backward."""
    c, m = action.chunk, action.microbatch
    if action.kind == "F":
        return ("F", m, c - 1) if c > 0 else None
    if action.kind == "W":
        return ("B", m, c)
    return ("B", m, c + 1) if c < num_chunks - 1 else ("F", m, c)


def clock_table(name: str, num_stages: int, num_microbatches: int, *, virtual_stages: int = 1,
                forward_time: float = 1.0, backward_time: float = 1.0, weight_time: float | None = None,
                latency: float = 0.0) -> list[Slot]:
    """Replay every rank's order; a dependency on another rank's action waits ``latency`` more.

    Times are per rank and micro-batch for the rank's whole share of the model, so schedules compare
    directly: a chunk takes ``1/v`` of them. ``backward_time`` is a full backward; a split schedule's
    ``W`` takes ``weight_time`` (default half) of it and its ``B`` the rest. A fused ``B`` (run with
    its ``W`` as one pass) hands its input gradient on only when its ``W`` is done.
    """
    split = check_schedule(name, virtual_stages).split_backward
    weight = backward_time / 2 if weight_time is None else weight_time
    cost = {"F": forward_time, "B": backward_time - weight if split else backward_time, "W": weight}
    num_chunks = num_stages * virtual_stages
    placed = chunk_stages(name, num_stages, virtual_stages)
    orders = [stage_order(name, s, num_stages, num_microbatches, virtual_stages) for s in range(num_stages)]
    done: dict[tuple[str, int, int], float] = {}
    handed: dict[tuple[str, int, int], float] = {}  # when the next chunk may use it, if later than done
    free = [0.0] * num_stages
    position = [0] * num_stages
    slots: list[Slot] = []
    while any(position[s] < len(orders[s]) for s in range(num_stages)):
        progressed = False
        for s in range(num_stages):
            while position[s] < len(orders[s]):
                action = orders[s][position[s]]
                dependency = _dependency(action, split, num_chunks)
                if dependency is not None and dependency not in done:
                    break
                ready = 0.0
                if dependency is not None:
                    available = done[dependency] if action.kind == "W" else handed.get(dependency, done[dependency])
                    ready = available + (latency if placed[dependency[2]] != s else 0.0)
                start = max(free[s], ready)
                end = start + cost[action.kind] / virtual_stages
                done[(action.kind, action.microbatch, action.chunk)] = free[s] = end
                if action.fused:
                    handed[("B", action.microbatch, action.chunk)] = end + cost["W"] / virtual_stages
                position[s] += 1
                slots.append(Slot(s, action, start, end))
                progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {name!r} deadlocks")
    return sorted(slots, key=lambda slot: (slot.start, slot.stage))


def makespan(slots: list[Slot]) -> float:
    return max(slot.end for slot in slots)


def peak_activations(name: str, stage: int, num_stages: int, num_microbatches: int, virtual_stages: int = 1) -> int:
    """Most chunk activations a rank holds at once: forwards whose backward (its ``W`` when split) has not run.

    With ``v`` chunks per rank each holds ``1/v`` of the rank's layers.
    """
    release = "W" if SCHEDULES[name].split_backward else "B"
    held = peak = 0
    for action in stage_order(name, stage, num_stages, num_microbatches, virtual_stages):
        held += 1 if action.kind == "F" else -1 if action.kind == release else 0
        peak = max(peak, held)
    return peak


def render(slots: list[Slot], num_stages: int) -> str:
    """Text clock table (one row per rank group; ``F3.1``: micro-batch 3 on the rank's second chunk)."""
    virtual = any(slot.action.chunk >= num_stages for slot in slots)
    times = sorted({slot.start for slot in slots})
    width = 5 if virtual else 3
    rows = []
    for s in range(num_stages):
        cells = {slot.start: str(slot.action) + (f".{slot.action.chunk // num_stages}" if virtual else "")
                 for slot in slots if slot.stage == s}
        rows.append(f"stage {s}: " + " ".join(f"{cells.get(t, '.'):>{width}}" for t in times))
    return "\n".join(rows)

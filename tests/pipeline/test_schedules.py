"""Schedule orders and clock tables: dependencies, flush, warm-up counts, held activations, bubbles."""

from __future__ import annotations

from typing import get_args

import pytest

from lightning_grendel.pipeline.schedule_orders import Action
from lightning_grendel.pipeline.schedules import (
    SCHEDULES,
    Schedule,
    chunk_stages,
    clock_table,
    makespan,
    peak_activations,
    render,
    stage_order,
)

SIZES = [(1, 1), (1, 4), (2, 1), (2, 5), (3, 3), (3, 6), (4, 2), (4, 8), (5, 12)]
V_SIZES = [(s, m) for s in (2, 3, 4) for m in range(s, 3 * s + 1)]  # S meshes, M micro-batches: S..3S
CASES = [(name, v) for name, schedule in SCHEDULES.items()
         for v in ((2,) if schedule.placement == "v" else (1, 2, 3) if schedule.virtual else (1,))]


@pytest.mark.parametrize("name, virtual", CASES)
@pytest.mark.parametrize("stages, microbatches", SIZES)
def test_dependencies_and_flush(name, virtual, stages, microbatches):
    if SCHEDULES[name].virtual:
        microbatches = max(stages * microbatches, SCHEDULES[name].min_rounds * stages)
    _check_clock_tables(name, virtual, stages, microbatches)


@pytest.mark.parametrize("name", [name for name, schedule in SCHEDULES.items() if schedule.placement == "v"])
def test_v_schedules_dependencies_and_flush(name):
    for stages, microbatches in V_SIZES:
        if microbatches >= SCHEDULES[name].min_rounds * stages:
            _check_clock_tables(name, 2, stages, microbatches)


def _check_clock_tables(name, virtual, stages, microbatches):
    split = SCHEDULES[name].split_backward
    chunks = stages * virtual
    placed = chunk_stages(name, stages, virtual)
    for latency in (0.0, 0.7):
        slots = clock_table(name, stages, microbatches, virtual_stages=virtual, backward_time=2.0, latency=latency)
        end = {(slot.action.kind, slot.action.microbatch, slot.action.chunk): slot for slot in slots}
        kinds = ("F", "B", "W") if split else ("F", "B")
        assert len(end) == len(slots) == len(kinds) * chunks * microbatches  # every action exactly once: a flush
        for (kind, m, c), slot in end.items():
            assert slot.stage == placed[c]  # chunk c lives on mesh c mod S, or in a V
            if kind == "W":
                assert end[("B", m, c)].end <= slot.start
            elif kind == "B":
                assert end[("F", m, c)].end <= slot.start  # forward before backward on the same chunk
                if c + 1 < chunks:  # a fused B hands its gradient on once its W is done
                    given = end[("W" if end[("B", m, c + 1)].action.fused else "B", m, c + 1)].end
                    assert given + latency * (placed[c + 1] != placed[c]) <= slot.start
            elif c > 0:  # the latency only between chunks on different meshes (not at a V's turn)
                assert end[("F", m, c - 1)].end + latency * (placed[c - 1] != placed[c]) <= slot.start
        for s in range(stages):  # a rank runs one action at a time, a fused B's W right after it
            own = sorted((slot for slot in slots if slot.stage == s), key=lambda slot: slot.start)
            assert all(a.end <= b.start + 1e-9 for a, b in zip(own, own[1:], strict=False))
            assert all(b.action == Action("W", a.action.microbatch, a.action.chunk)
                       for a, b in zip(own, own[1:], strict=False) if a.action.fused)
        for c in range(chunks):  # micro-batches in order within a chunk: the transfer lanes rely on it
            for kind in kinds:
                starts = [end[(kind, m, c)].start for m in range(microbatches)]
                assert starts == sorted(starts)


def _leading_forwards(order):
    count = 0
    for action in order:
        if action.kind != "F":
            break
        count += 1
    return count


@pytest.mark.parametrize("stages, microbatches", SIZES)
def test_warmup_and_peak_activations(stages, microbatches):
    for s in range(stages):
        assert _leading_forwards(stage_order("1f1b", s, stages, microbatches)) == min(microbatches, stages - s)
        assert _leading_forwards(stage_order("eager_1f1b", s, stages, microbatches)) == min(microbatches,
                                                                                            2 * (stages - s) - 1)
        assert peak_activations("1f1b", s, stages, microbatches) == min(microbatches, stages - s)
        assert peak_activations("eager_1f1b", s, stages, microbatches) == min(microbatches, 2 * (stages - s) - 1)
        assert peak_activations("gpipe", s, stages, microbatches) == microbatches
        # ZB-H1 holds back up to s weight passes: every stage holds 1F1B's first-stage peak, no more
        assert peak_activations("zb_h1", s, stages, microbatches) == min(microbatches, stages)
        # interleaved, rounds of S micro-batches: 2(S-r-1) + (v-1)S warm-up forwards, one more before a backward
        for v in (2, 3):
            rounds = stages * microbatches
            want = min(rounds * v, 2 * (stages - s - 1) + (v - 1) * stages + 1)
            assert _leading_forwards(stage_order("interleaved_1f1b", s, stages, rounds, v)) == want
            assert peak_activations("interleaved_1f1b", s, stages, rounds, v) == want
            eager = min(rounds * v, want + stages - 1)
            assert _leading_forwards(stage_order("eager_interleaved_1f1b", s, stages, rounds, v)) == eager
            assert peak_activations("eager_interleaved_1f1b", s, stages, rounds, v) == eager


def test_paper_counts():
    assert [peak_activations("eager_1f1b", s, 4, 8) for s in range(4)] == [7, 5, 3, 1]
    assert [peak_activations("1f1b", s, 4, 8) for s in range(4)] == [4, 3, 2, 1]
    # Megatron's interleaved schedule, 4 ranks, v = 2: rank 0 holds 11 half-stage activations (5.5 stages' worth)
    assert [peak_activations("interleaved_1f1b", s, 4, 8, 2) for s in range(4)] == [11, 9, 7, 5]


@pytest.mark.parametrize("stages, microbatches", [(2, 4), (3, 6), (4, 8), (4, 16)])
def test_bubbles(stages, microbatches):
    """Closed forms: 1F1B's bubble (S-1)(F+B), interleaved's (S-1)(F+B)/v, ZB-H1's (S-1)(F+B-2W)."""
    f, b, w = 1.0, 2.0, 1.0
    work = microbatches * (f + b)
    assert makespan(clock_table("1f1b", stages, microbatches, backward_time=b)) == work + (stages - 1) * (f + b)
    assert makespan(clock_table("gpipe", stages, microbatches, backward_time=b)) == work + (stages - 1) * (f + b)
    for v in (2, 4):
        got = makespan(clock_table("interleaved_1f1b", stages, microbatches, virtual_stages=v, backward_time=b))
        assert got == pytest.approx(work + (stages - 1) * (f + b) / v)
    got = makespan(clock_table("zb_h1", stages, microbatches, backward_time=b, weight_time=w))
    assert got == work + (stages - 1) * (f + b - 2 * w)


def test_same_bubble_without_latency_and_eager_hides_latency():
    assert makespan(clock_table("eager_1f1b", 4, 8)) == makespan(clock_table("1f1b", 4, 8))
    assert makespan(clock_table("eager_1f1b", 4, 8, latency=1.0)) < makespan(clock_table("1f1b", 4, 8, latency=1.0))
    for stages, microbatches in ((2, 4), (3, 6), (4, 8), (4, 12)):
        sizes = dict(virtual_stages=2, backward_time=2.0)
        plain = [makespan(clock_table("interleaved_1f1b", stages, microbatches, latency=lat, **sizes))
                 for lat in (0.0, 0.3, 1.0)]
        eager = [makespan(clock_table("eager_interleaved_1f1b", stages, microbatches, latency=lat, **sizes))
                 for lat in (0.0, 0.3, 1.0)]
        assert eager[0] == plain[0] and all(e <= p for e, p in zip(eager, plain, strict=True))
    assert makespan(clock_table("eager_interleaved_1f1b", 4, 8, virtual_stages=2, backward_time=2.0, latency=1.0)) < \
        makespan(clock_table("interleaved_1f1b", 4, 8, virtual_stages=2, backward_time=2.0, latency=1.0))


def test_registry_and_errors():
    assert set(SCHEDULES) == set(get_args(Schedule))
    with pytest.raises(ValueError, match="unknown pipeline schedule"):
        stage_order("zero_bubble", 0, 2, 2)
    with pytest.raises(ValueError, match="virtual_stages=2 needs one of"):
        stage_order("1f1b", 0, 2, 2, virtual_stages=2)
    with pytest.raises(ValueError, match="must be a multiple of the 3 stage meshes"):
        stage_order("interleaved_1f1b", 0, 3, 4, virtual_stages=2)


def test_render_names_chunks():
    table = render(clock_table("interleaved_1f1b", 2, 2, virtual_stages=2), 2)
    assert table.splitlines()[0].split()[2:4] == ["F0.0", "F1.0"]
    assert "W0" in render(clock_table("zb_h1", 2, 2), 2)


# -- the V schedules ----------------------------------------------------------------------------------------

V_TORCH = {"zbv": "ScheduleZBVZeroBubble", "dualpipev": "ScheduleDualPipeV"}


def _torch_order(class_name, rank, stages, microbatches):
    """torch's own per-rank order (its generator on a bare instance: no stages or process group needed)."""
    from torch.distributed.pipelining import schedules as torch_schedules
    from torch.distributed.pipelining.schedules import _ComputationType as Kind

    schedule = object.__new__(getattr(torch_schedules, class_name))
    schedule.pp_group_size, schedule._n_microbatches = stages, microbatches
    schedule.num_stages = schedule._num_stages = 2 * stages
    names = {Kind.FORWARD: "F", Kind.BACKWARD_INPUT: "B", Kind.BACKWARD_WEIGHT: "W"}
    order = []
    for action in schedule._calculate_single_rank_operations(rank):
        if action is None:
            continue
        for part in action.sub_actions if action.computation_type == Kind.OVERLAP_F_B else (action,):
            m, c = part.microbatch_index, part.stage_index
            if part.computation_type == Kind.FULL_BACKWARD:  # one pass: a fused B and its W
                order += [Action("B", m, c, fused=True), Action("W", m, c)]
            else:
                order.append(Action(names[part.computation_type], m, c))
    return order


@pytest.mark.parametrize("name", sorted(V_TORCH))
def test_v_orders_equal_torchs(name):
    """Action by action, torch's full backward as B then W and its overlapped pairs as F then B, W."""
    compared = 0
    for stages in range(1, 6):
        for microbatches in range(max(1, SCHEDULES[name].min_rounds * stages), 3 * stages + 2):
            for rank in range(stages):
                want = _torch_order(V_TORCH[name], rank, stages, microbatches)
                assert stage_order(name, rank, stages, microbatches, 2) == want, (stages, microbatches, rank)
                compared += 1
    assert compared > 50


def _runs_with_fifo_lanes(name, stages, microbatches, virtual):
    """Replay with rendezvous sends: one FIFO per (rank, direction, lane) whose head waits until taken."""
    from collections import deque

    from lightning_grendel.pipeline.schedules import boundary_lanes

    placed, lanes = chunk_stages(name, stages, virtual), boundary_lanes(name, stages, virtual)
    last = len(placed) - 1
    orders = [stage_order(name, s, stages, microbatches, virtual) for s in range(stages)]
    fifos = {}
    position = [0] * stages
    progressed = True
    while progressed:
        progressed = False
        for s in range(stages):
            while position[s] < len(orders[s]):
                a = orders[s][position[s]]
                wanted = {"F": a.chunk - 1 if a.chunk > 0 else None, "B": a.chunk + 1 if a.chunk < last else None}
                source = wanted.get(a.kind)
                if source is not None and placed[source] != s:
                    boundary = min(source, a.chunk)
                    queue = fifos.get((placed[source], a.kind, lanes[boundary]), deque())
                    if not queue or queue[0] != (boundary, a.microbatch):
                        break
                    queue.popleft()
                target = {"F": a.chunk + 1 if a.chunk < last else None, "B": a.chunk - 1 if a.chunk > 0 else None}
                to = target.get(a.kind)
                if to is not None and placed[to] != s:
                    boundary = min(to, a.chunk)
                    fifos.setdefault((s, a.kind, lanes[boundary]), deque()).append((boundary, a.microbatch))
                position[s] += 1
                progressed = True
    return all(position[s] == len(orders[s]) for s in range(stages))


def test_no_schedule_deadlocks_on_fifo_transfer_lanes():
    """A send completes only when taken (outbox.py): under a V a mesh sends down and back up the V, so
    each half gets its own lane; with one FIFO per direction ZBV deadlocks from 4 meshes on."""
    for name, schedule in SCHEDULES.items():
        for stages in range(2, 6):
            for microbatches in range(max(1, schedule.min_rounds * stages), 3 * stages + 1):
                for virtual in ((2,) if schedule.placement == "v" else (2, 3) if schedule.virtual else (1,)):
                    if schedule.virtual and schedule.placement == "loop" and microbatches % stages:
                        continue
                    assert _runs_with_fifo_lanes(name, stages, microbatches, virtual), (name, stages, microbatches)


@pytest.mark.parametrize("stages, microbatches", V_SIZES)
def test_v_bubbles_and_peak_activations(stages, microbatches):
    """With every chunk action taking t (F = B = W per chunk; per rank F = 2t, B = 4t, W = 2t), both V
    schedules' bubble is (S-1)t once the V is full: half ZB-H1's 2(S-1)t, a sixth of 1F1B's 6(S-1)t.
    Chunk activations held: ZBV min(2S, M+r+1) (2S = 1F1B's first-stage S stages' worth on every rank),
    DualPipeV 2S+1 (DeepSeek's PP+1 with PP = 2S chunks)."""
    t = 1.0
    sizes = dict(forward_time=2 * t, backward_time=4 * t, weight_time=2 * t)
    work = microbatches * 6 * t
    if microbatches >= 2 * stages - 1:
        assert makespan(clock_table("zbv", stages, microbatches, virtual_stages=2, **sizes)) == work + (stages - 1) * t
        assert makespan(clock_table("zb_h1", stages, microbatches, **sizes)) == work + 2 * (stages - 1) * t
        assert makespan(clock_table("1f1b", stages, microbatches, **sizes)) == work + 6 * (stages - 1) * t
    if microbatches >= 2 * stages:
        got = makespan(clock_table("dualpipev", stages, microbatches, virtual_stages=2, **sizes))
        assert got == work + (stages - 1) * t
    for rank in range(stages):
        assert peak_activations("zbv", rank, stages, microbatches, 2) == min(2 * stages, microbatches + rank + 1)
        if microbatches >= 2 * stages:
            assert peak_activations("dualpipev", rank, stages, microbatches, 2) == 2 * stages + 1


def test_v_placement_and_refusals():
    assert chunk_stages("zbv", 3, 2) == [0, 1, 2, 2, 1, 0]  # mesh 0 holds the first and the last chunk
    assert chunk_stages("interleaved_1f1b", 3, 2) == [0, 1, 2, 0, 1, 2]
    for name in ("zbv", "dualpipev"):
        for v in (1, 3):
            with pytest.raises(ValueError, match=f"schedule '{name}' runs two chunks per stage mesh in a V: "
                                                 f"virtual_stages must be 2, got {v}"):
                stage_order(name, 0, 2, 4, virtual_stages=v)
    with pytest.raises(ValueError, match="'dualpipev' needs num_microbatches >= 2 x the 3 stage meshes"):
        stage_order("dualpipev", 0, 3, 5, virtual_stages=2)
    stage_order("zbv", 0, 3, 4, virtual_stages=2)  # ZBV takes any count, as torch's does
    table = render(clock_table("zbv", 2, 2, virtual_stages=2), 2)
    assert table.splitlines()[1].split()[3:5] == ["F0.0", "F0.1"]  # the turn: mesh 1 runs chunk 1, then chunk 2

"""Schedule orders and clock tables: dependencies, flush, warm-up counts, held activations, bubbles."""

from __future__ import annotations

from typing import get_args

import pytest

from lightning_grendel.pipeline.schedules import (
    SCHEDULES,
    Schedule,
    clock_table,
    makespan,
    peak_activations,
    render,
    stage_order,
)

SIZES = [(1, 1), (1, 4), (2, 1), (2, 5), (3, 3), (3, 6), (4, 2), (4, 8), (5, 12)]
CASES = [(name, v) for name, schedule in SCHEDULES.items() for v in ((1, 2, 3) if schedule.virtual else (1,))]


@pytest.mark.parametrize("name, virtual", CASES)
@pytest.mark.parametrize("stages, microbatches", SIZES)
def test_dependencies_and_flush(name, virtual, stages, microbatches):
    if SCHEDULES[name].virtual:
        microbatches = stages * microbatches
    split = SCHEDULES[name].split_backward
    chunks = stages * virtual
    for latency in (0.0, 0.7):
        slots = clock_table(name, stages, microbatches, virtual_stages=virtual, backward_time=2.0, latency=latency)
        end = {(slot.action.kind, slot.action.microbatch, slot.action.chunk): slot for slot in slots}
        kinds = ("F", "B", "W") if split else ("F", "B")
        assert len(end) == len(slots) == len(kinds) * chunks * microbatches  # every action exactly once: a flush
        for (kind, m, c), slot in end.items():
            assert slot.stage == c % stages  # chunk c lives on mesh c mod S
            hop = latency if stages > 1 else 0.0
            if kind == "W":
                assert end[("B", m, c)].end <= slot.start
            elif kind == "B":
                assert end[("F", m, c)].end <= slot.start  # forward before backward on the same chunk
                if c + 1 < chunks:
                    assert end[("B", m, c + 1)].end + hop <= slot.start
            elif c > 0:
                assert end[("F", m, c - 1)].end + hop <= slot.start
        for s in range(stages):  # a rank runs one action at a time
            own = sorted((slot for slot in slots if slot.stage == s), key=lambda slot: slot.start)
            assert all(a.end <= b.start + 1e-9 for a, b in zip(own, own[1:], strict=False))
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

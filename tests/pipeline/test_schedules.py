"""Schedule orders and clock tables: dependencies, warm-up counts, in-flight activations, latency hiding."""

from __future__ import annotations

import pytest

from lightning_grendel.pipeline.schedules import (
    SCHEDULES,
    clock_table,
    makespan,
    peak_in_flight,
    stage_order,
    warmup_forwards,
)

SIZES = [(1, 1), (1, 4), (2, 1), (2, 5), (3, 3), (3, 6), (4, 2), (4, 8), (5, 12)]


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("stages, microbatches", SIZES)
def test_dependencies_and_flush(name, stages, microbatches):
    for latency in (0.0, 0.7):
        slots = clock_table(name, stages, microbatches, backward_time=2.0, latency=latency)
        end = {(slot.stage, slot.action.kind, slot.action.microbatch): slot for slot in slots}
        assert len(end) == 2 * stages * microbatches  # every F and B of the step exactly once: a flush
        for (s, kind, m), slot in end.items():
            if kind == "B":
                assert end[(s, "F", m)].end <= slot.start  # forward before backward on the same stage
                if s + 1 < stages:
                    assert end[(s + 1, "B", m)].end + latency <= slot.start
            elif s > 0:
                assert end[(s - 1, "F", m)].end + latency <= slot.start
        for s in range(stages):  # a stage runs one action at a time
            own = sorted((slot for slot in slots if slot.stage == s), key=lambda slot: slot.start)
            assert all(a.end <= b.start for a, b in zip(own, own[1:], strict=False))


@pytest.mark.parametrize("stages, microbatches", SIZES)
def test_warmup_and_peak_activations(stages, microbatches):
    for s in range(stages):
        one = stage_order("1f1b", s, stages, microbatches)
        eager = stage_order("eager_1f1b", s, stages, microbatches)
        assert _leading_forwards(one) == min(microbatches, stages - s)  # S-s-1 warm-up, then F before B
        assert _leading_forwards(eager) == min(microbatches, 2 * (stages - s) - 1)
        assert warmup_forwards("eager_1f1b", s, stages, microbatches) == min(microbatches, 2 * (stages - s) - 1)
        assert peak_in_flight("1f1b", s, stages, microbatches) == min(microbatches, stages - s)
        assert peak_in_flight("eager_1f1b", s, stages, microbatches) == min(microbatches, 2 * (stages - s) - 1)
        assert peak_in_flight("gpipe", s, stages, microbatches) == microbatches


def _leading_forwards(order):
    count = 0
    for action in order:
        if action.kind != "F":
            break
        count += 1
    return count


def test_paper_example_in_flight_counts():
    assert [peak_in_flight("eager_1f1b", s, 4, 8) for s in range(4)] == [7, 5, 3, 1]
    assert [peak_in_flight("1f1b", s, 4, 8) for s in range(4)] == [4, 3, 2, 1]


def test_same_bubble_without_latency_and_eager_hides_latency():
    assert makespan(clock_table("eager_1f1b", 4, 8)) == makespan(clock_table("1f1b", 4, 8))
    eager = makespan(clock_table("eager_1f1b", 4, 8, latency=1.0))
    one = makespan(clock_table("1f1b", 4, 8, latency=1.0))
    assert eager < one


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown pipeline schedule"):
        stage_order("zero_bubble", 0, 2, 2)

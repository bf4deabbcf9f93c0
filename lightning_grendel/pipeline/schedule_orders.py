"""Per-rank action orders of every pipeline schedule (pure functions, no torch).

A rank holds the model chunks ``c`` with ``c % num_ranks == rank`` (one chunk per rank unless the
schedule interleaves virtual stages; the V schedules of ``v_schedule_orders.py`` place theirs in a V).
Within a chunk, forwards and backwards run in micro-batch order in every schedule, so each transfer
lane sees its messages in the order the receiver asks for them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Action:
    """``F`` forward, ``B`` backward (input gradient only where the schedule splits it), ``W`` weight
    gradient; ``chunk`` is the model chunk (the stage when there are no virtual stages). A ``fused``
    ``B`` is directly followed by its ``W`` and runs with it as one backward (torch's full backward):
    less work than two passes, its input gradient sent once both are done."""

    kind: str
    microbatch: int
    chunk: int
    fused: bool = False

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}"


def _alternate(forwards: list[Action], backwards: list[Action], warmup: int, backward_first: bool) -> list[Action]:
    """``warmup`` forwards, then one of each (backward first or forward first) until both run out."""
    order = forwards[:warmup]
    queues = (backwards, forwards[warmup:]) if backward_first else (forwards[warmup:], backwards)
    first, second = (list(q) for q in queues)
    while first or second:
        for pending in (first, second):
            if pending:
                order.append(pending.pop(0))
    return order


def _plain(rank: int, num_microbatches: int, kind: str) -> list[Action]:
    return [Action(kind, m, rank) for m in range(num_microbatches)]


def gpipe_order(rank: int, num_ranks: int, num_microbatches: int, virtual_stages: int) -> list[Action]:
    """Every forward, then every backward."""
    return _plain(rank, num_microbatches, "F") + _plain(rank, num_microbatches, "B")


def one_f_one_b_order(rank: int, num_ranks: int, num_microbatches: int, virtual_stages: int) -> list[Action]:
    """``S-s-1`` warm-up forwards, then forward/backward pairs (PipeDream-flush)."""
    warmup = min(num_microbatches, num_ranks - rank - 1)
    return _alternate(_plain(rank, num_microbatches, "F"), _plain(rank, num_microbatches, "B"), warmup, False)


def eager_one_f_one_b_order(rank: int, num_ranks: int, num_microbatches: int, virtual_stages: int) -> list[Action]:
    """``2(S-s)-1`` forwards in flight before the first backward, then backward/forward pairs."""
    warmup = min(num_microbatches, 2 * (num_ranks - rank) - 1)
    return _alternate(_plain(rank, num_microbatches, "F"), _plain(rank, num_microbatches, "B"), warmup, True)


def _chunk_sequence(rank: int, num_ranks: int, num_microbatches: int, virtual_stages: int,
                    kind: str) -> list[Action]:
    """Rounds of ``S`` micro-batches; in each, every local chunk in turn (forwards ascending, backwards
    descending), so a rank moves to its next chunk as soon as the round has passed the other ranks."""
    chunks = [j * num_ranks + rank for j in range(virtual_stages)]
    if kind == "B":
        chunks.reverse()
    return [Action(kind, m, chunk) for base in range(0, num_microbatches, num_ranks) for chunk in chunks
            for m in range(base, min(base + num_ranks, num_microbatches))]


def interleaved_warmup(rank: int, num_ranks: int, num_microbatches: int, virtual_stages: int, eager: bool) -> int:
    """Chunk forwards before the first 1F1B pair: ``2(S-r-1) + (v-1)S`` (Narayanan et al. 2021).

    The eager form adds ``S-1`` on every rank (eager 1F1B's extra on its first stage). The same extra
    everywhere keeps each rank's lead over the next, so the order cannot deadlock (an extra of
    ``S-r-1``, as eager 1F1B uses, does across the wrap from the last mesh to the first).
    """
    warmup = 2 * (num_ranks - rank - 1) + (virtual_stages - 1) * num_ranks + (num_ranks - 1 if eager else 0)
    return min(num_microbatches * virtual_stages, warmup)


def _interleaved(rank: int, num_ranks: int, num_microbatches: int, virtual_stages: int, eager: bool) -> list[Action]:
    forwards = _chunk_sequence(rank, num_ranks, num_microbatches, virtual_stages, "F")
    backwards = _chunk_sequence(rank, num_ranks, num_microbatches, virtual_stages, "B")
    warmup = interleaved_warmup(rank, num_ranks, num_microbatches, virtual_stages, eager)
    return _alternate(forwards, backwards, warmup, False)


def interleaved_order(rank: int, num_ranks: int, num_microbatches: int, virtual_stages: int) -> list[Action]:
    """Interleaved 1F1B over ``v`` chunks per rank: the bubble shrinks by ``v`` for ``v`` times the transfers."""
    return _interleaved(rank, num_ranks, num_microbatches, virtual_stages, eager=False)


def eager_interleaved_order(rank: int, num_ranks: int, num_microbatches: int, virtual_stages: int) -> list[Action]:
    """Interleaved 1F1B with ``S-1`` more forwards in flight: each forward output has slack to travel."""
    return _interleaved(rank, num_ranks, num_microbatches, virtual_stages, eager=True)


def zb_h1_order(rank: int, num_ranks: int, num_microbatches: int, virtual_stages: int) -> list[Action]:
    """ZB-H1 (Qi et al. 2024): 1F1B's forwards and input-gradient passes, weight passes held back.

    Stage ``s`` keeps up to ``s`` weight passes pending, so every stage holds at most ``S`` micro-batches
    (1F1B's peak, on its first stage); the held-back passes fill the bubbles at the end of the step.
    """
    order: list[Action] = []
    pending: list[Action] = []
    for action in one_f_one_b_order(rank, num_ranks, num_microbatches, 1):
        order.append(action)
        if action.kind == "B":
            pending.append(Action("W", action.microbatch, action.chunk))
            if len(pending) > rank:
                order.append(pending.pop(0))
    return order + pending

"""Per-rank orders of the V-shaped schedules, ZBV and DualPipeV (pure functions, no torch).

Both run ``2S`` chunks on ``S`` ranks in a V: rank ``r`` holds chunk ``r`` on the way down and chunk
``2S-1-r`` on the way back, so rank 0 holds the first and the last chunk and the turn (chunk ``S-1``
to chunk ``S``) stays on rank ``S-1``. Both split the backward: ``B`` is the input gradient, ``W`` the
weight gradient. The orders are those torch 2.14 generates (``ScheduleZBVZeroBubble``,
``ScheduleDualPipeV``; a test compares them action by action), with DualPipeV's full backward written
as a ``B`` fused with the ``W`` after it, and its overlapped forward/backward pairs run one after the
other (forward first).
"""

from __future__ import annotations

from lightning_grendel.pipeline.schedule_orders import Action


def v_chunks(rank: int, num_ranks: int) -> tuple[int, int]:
    """The chunks rank ``rank`` holds in a V over ``num_ranks`` ranks: down the V, then back up."""
    return rank, 2 * num_ranks - 1 - rank


def v_stage(chunk: int, num_ranks: int) -> int:
    """The rank (stage mesh) holding ``chunk`` in a V."""
    return chunk if chunk < num_ranks else 2 * num_ranks - 1 - chunk


class _Emitter:
    """Appends actions, each chunk's micro-batches counted per kind; ``B`` queues its ``W`` when asked."""

    def __init__(self, rank: int, num_ranks: int) -> None:
        self.chunks = v_chunks(rank, num_ranks)
        self.order: list[Action] = []
        self.count: dict[tuple[str, int], int] = {}
        self.pending: list[Action] = []  # weight passes held back, oldest first

    def emit(self, kind: str, local: int, queue_weight: bool = False) -> None:
        chunk = self.chunks[local]
        m = self.count.get((kind, chunk), 0)
        self.count[(kind, chunk)] = m + 1
        self.order.append(Action(kind, m, chunk))
        if queue_weight:
            self.pending.append(Action("W", m, chunk))

    def backward_and_weight(self, local: int, fused: bool) -> None:
        """``B`` then its ``W``: one pass when ``fused`` (torch's full backward), else two."""
        chunk = self.chunks[local]
        m = self.count.get(("B", chunk), 0)
        self.count[("B", chunk)] = m + 1
        self.order += [Action("B", m, chunk, fused=fused), Action("W", m, chunk)]

    def weight_if_pending(self, local: int | None = None) -> None:
        """The oldest held-back weight pass (of chunk ``local`` when given), if any."""
        wanted = [w for w in self.pending if local is None or w.chunk == self.chunks[local]]
        if wanted:
            self.pending.remove(wanted[0])
            self.order.append(wanted[0])

    def emitted(self, kind: str, local: int) -> int:
        return self.count.get((kind, self.chunks[local]), 0)


def zbv_order(rank: int, num_ranks: int, num_microbatches: int, virtual_stages: int) -> list[Action]:
    """ZB-V (Qi et al. 2024, section 6): warm-up down the V, then ``F B W`` on each chunk in turn.

    Its ``B`` and ``W`` stay two passes even where adjacent (torch runs them apart too), so the input
    gradient leaves before the weight pass.

    The order is made for at least ``2S-1`` micro-batches (enough to fill the V) and the actions of
    micro-batches past ``num_microbatches`` are dropped, as torch does.
    """
    S, r = num_ranks, rank
    n = max(2 * S - 1, num_microbatches)
    e = _Emitter(r, S)
    for _ in range(2 * (S - r) - 1):
        e.emit("F", 0)
    for _ in range(r):
        e.emit("F", 1)
        e.emit("F", 0)
    for _ in range(S - r):
        e.emit("F", 1)
        e.backward_and_weight(1, fused=False)
    while e.emitted("F", 1) < e.emitted("F", 0) or e.emitted("F", 0) < n:
        if e.emitted("F", 0) < n:
            e.emit("F", 0)
        e.backward_and_weight(0, fused=False)
        e.emit("F", 1)
        e.backward_and_weight(1, fused=False)
    for _ in range(r):
        e.emit("B", 0, queue_weight=True)
        e.emit("B", 1, queue_weight=True)
    for _ in range(S - r):
        e.emit("B", 0, queue_weight=True)
        e.weight_if_pending(0)
    e.order += sorted(e.pending, key=lambda w: (w.chunk != e.chunks[1], w.microbatch))
    return [action for action in e.order if action.microbatch < num_microbatches]


def dualpipev_order(rank: int, num_ranks: int, num_microbatches: int, virtual_stages: int) -> list[Action]:
    """DualPipeV (DeepSeek-V3's DualPipe folded onto half the ranks; ``num_microbatches >= 2S``).

    Warm-up forwards down the V, zero-bubble ``B W F`` steps on the way back, then the main phase of
    forward/backward pairs on opposite chunks (overlapped on a GPU, one after the other here), and a
    cool-down whose later backwards hold their weight passes back to fill the drain.
    """
    S, r, M = num_ranks, rank, num_microbatches
    e = _Emitter(r, S)
    for _ in range(2 * (S - r - 1)):
        e.emit("F", 0)
    for _ in range(r + 1):
        e.emit("F", 0)
        e.emit("F", 1)
    for _ in range(S - r - 1):
        e.emit("B", 1, queue_weight=True)
        e.weight_if_pending()
        e.emit("F", 1)
    for _ in range(M - 2 * S + r + 1):
        e.emit("F", 0)
        e.backward_and_weight(1, fused=True)
        e.emit("F", 1)
        e.backward_and_weight(0, fused=True)
    for _ in range(S - r - 1):
        e.backward_and_weight(1, fused=True)
        e.emit("F", 1)
        e.backward_and_weight(0, fused=True)
    split = False  # from the middle of this phase on, backwards leave their weight passes for the drain
    for i in range(r + 1):
        for local, parity in ((1, 1), (0, 0)):
            if i == (r + 1) // 2 and r % 2 == parity:
                split = True
            if split:
                e.emit("B", local, queue_weight=True)
            else:
                e.backward_and_weight(local, fused=True)
    for _ in range(S - r - 1):
        e.weight_if_pending()
        e.emit("B", 0, queue_weight=True)
    for _ in range(r + 1):
        e.weight_if_pending()
    return e.order

"""Outgoing transfers of a pipeline rank: one FIFO thread per lane, each with its own groups.

A send completes only once its receiver has asked for it, so one FIFO for both directions could hold a
gradient behind an activation the receiver wants later (with two stage meshes, or interleaved chunks,
both directions go to the same peer). Forward and backward lanes therefore run on their own threads,
with their own process groups (collectives on one group must run in one order on every member) and,
for the shared-memory transport, their own arenas. Under a V placement a rank sends both down and back
up the V in each direction, so each half of the V gets a lane per direction of its own
(``schedules.boundary_lanes``). Within a lane, messages leave in the order the receiver takes them:
every schedule runs a chunk's micro-batches in order.
"""

from __future__ import annotations

import queue
import threading
import time

import torch

from lightning_grendel.resharding.executors import GroupCache, start_plan
from lightning_grendel.resharding.plan import ReshardPlan
from lightning_grendel.resharding.shm import SharedMemoryArenas


class Outbox:
    """FIFO of outgoing reshardings run by one thread, each started no earlier than ``latency_s``."""

    def __init__(self, rank: int, groups: GroupCache, latency_s: float, shm: SharedMemoryArenas | None) -> None:
        self._rank, self._groups, self._latency, self._shm = rank, groups, latency_s, shm
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def put(self, plan: ReshardPlan, tensor: torch.Tensor, tag: int) -> None:
        self._queue.put((time.perf_counter() + self._latency, plan, tensor, tag))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            due, plan, tensor, tag = item
            try:
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                if self._error is None:
                    start_plan(plan, self._rank, tensor, self._groups, tag, self._shm).wait()
            except BaseException as error:  # noqa: BLE001 - re-raised on the main thread in flush()
                self._error = error
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        self._queue.join()
        if self._error is not None:
            raise RuntimeError("a pipeline send failed") from self._error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)


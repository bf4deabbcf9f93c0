"""Run a function on several gloo ranks in spawned processes, with a file:// rendezvous and timeouts.

Used by every multi-process test: no fixed ports, one torch thread per rank, and a hard deadline so a
broken collective fails the test instead of hanging it.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, init_file: str, timeout_s: float, fn: Callable, args: tuple,
            results: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        results[rank] = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - the traceback goes back to the test process
        results[rank] = ("error", traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 60.0) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return each rank's result.

    ``fn`` must be a module-level function and its result picklable. Any rank's exception fails the call
    with that rank's traceback.
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        manager = mp.Manager()
        results = manager.dict()
        context = mp.start_processes(
            _worker,
            args=(world_size, init_file, timeout_s, fn, args, results),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = max(300, timeout_s * 2 + 30)  # a loaded 2-core machine runs slow; the group's own timeout stays
        start = datetime.datetime.now()
        try:
            while not context.join(timeout=1.0):
                if (datetime.datetime.now() - start).total_seconds() > deadline:
                    for process in context.processes:
                        process.kill()
                    raise TimeoutError(f"distributed test did not finish within {deadline:.0f} s")
        except mp.ProcessRaisedException as error:
            messages = [value[1] for value in results.values() if value[0] == "error"]
            raise AssertionError("\n".join(messages) or str(error)) from None
        collected = [results[rank][1] for rank in range(world_size)]
        manager.shutdown()
        return collected

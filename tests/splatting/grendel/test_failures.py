"""A dead or stuck rank makes the others fail with an error within the process-group timeout, not hang."""

from __future__ import annotations

import datetime
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 5


def _rank(rank: int, init_file: str, behaviour: str, queue) -> None:
    from lightning_grendel.splatting.gaussians import make_parameters
    from lightning_grendel.splatting.grendel.balancer import LoadBalancer
    from lightning_grendel.splatting.grendel.renderer import GrendelRenderer
    from tests.helpers.scenes import orbit_cameras, random_gaussians

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    if rank == 1:
        if behaviour == "dies":
            os._exit(3)
        time.sleep(TIMEOUT_S * 4)  # stuck: never joins the collective
        os._exit(0)
    params = make_parameters(random_gaussians(20, sh_degree=0))
    renderer = GrendelRenderer(LoadBalancer("pairs"), backend="torch")
    start = time.monotonic()
    try:
        renderer(params, orbit_cameras(1, 32, 32), 0, torch.zeros(3))
        queue.put(("no error", time.monotonic() - start))
    except Exception as error:  # noqa: BLE001 - the test inspects it
        queue.put((f"{type(error).__name__}: {error}", time.monotonic() - start))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("behaviour", ["dies", "stuck"])
def test_other_ranks_fail_within_the_timeout(behaviour):
    context = mp.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        processes = [context.Process(target=_rank, args=(r, init_file, behaviour, queue)) for r in range(2)]
        for process in processes:
            process.start()
        message, elapsed = queue.get(timeout=90)
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    assert message != "no error"
    assert "RuntimeError" in message or "DistBackendError" in message
    assert elapsed < TIMEOUT_S * 3

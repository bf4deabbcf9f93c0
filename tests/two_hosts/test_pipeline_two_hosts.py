"""A 2-stage pipeline with one stage per host, stage meshes of 2 ranks: equal to the unpipelined model.

Stage 0 holds rows over ranks 0 and 1 (host 0); stage 1 replicates them on ranks 2 and 3 (host 1), so
each activation block is a broadcast from one host into the other: with ``transport="auto"`` it crosses
the link once (gloo) and rank 2 hands it to rank 3 through shared memory. Which transport moved which
pair is read from the runtime and checked against the arena files each host's own ``/dev/shm`` held.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_grendel._two_hosts import TwoHosts
from lightning_grendel.pipeline.runtime import PipelineRuntime
from lightning_grendel.pipeline.stages import Pipeline, PipelineStage
from lightning_grendel.resharding import Mesh

MESHES = [Mesh([0, 1], (2, 1)), Mesh([2, 3], (1, 2))]  # rows over host 0; replicated on host 1


def _modules() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(5, 8), nn.Tanh()), nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(12, 5, generator=generator), torch.randint(0, 3, (12,), generator=generator)


def _pipeline_rank(rank: int, world: int) -> dict:
    modules = _modules()
    runtime = PipelineRuntime(Pipeline([PipelineStage(m, "S0") for m in modules], F.cross_entropy), MESHES,
                              num_microbatches=3, transport="auto", timeout_s=60)
    loss = runtime.step(_data())
    report = {"loss": loss, "grads": [p.grad.clone() for p in modules[runtime.stage].parameters()],
              "stage": runtime.stage, "transports": sorted(runtime.transports()),
              "shm": sorted(name.rsplit("_rank", 1)[1] for name in os.listdir("/dev/shm"))}
    runtime.close()
    try:
        PipelineRuntime(Pipeline([PipelineStage(m, "S0") for m in _modules()], F.cross_entropy), MESHES,
                        transport="shm", timeout_s=60)
        report["shm_error"] = ""
    except ValueError as error:
        report["shm_error"] = str(error)
    return report


@pytest.mark.timeout(180)
def test_pipeline_across_hosts_equals_unpipelined_and_follows_host_boundaries(two_hosts: TwoHosts):
    reference = _modules()
    x, y = _data()
    want = F.cross_entropy(nn.Sequential(*reference)(x), y)
    want.backward()
    reports = two_hosts.run("tests.two_hosts.test_pipeline_two_hosts:_pipeline_rank", (2, 2), timeout_s=90)
    assert [r["stage"] for r in reports] == [0, 0, 1, 1]
    for rank, report in enumerate(reports):
        torch.testing.assert_close(report["loss"], want.detach(), rtol=1e-5, atol=0)
        wanted = [p.grad for p in reference[report["stage"]].parameters()]
        for got, expected in zip(report["grads"], wanted, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7, msg=f"rank {rank}")
    forward = {(a, b, kind) for direction, a, b, kind in reports[0]["transports"] if direction == "forward"}
    backward = {(a, b, kind) for direction, a, b, kind in reports[0]["transports"] if direction == "backward"}
    # Each of 0 and 1 broadcasts its rows to both replicas: across the link to rank 2, then 2 -> 3 in memory.
    assert forward == {(0, 2, "dist"), (1, 2, "dist"), (2, 3, "shm")}
    # Gradients go from a replica on host 1 to the rank holding those rows on host 0, over gloo.
    assert backward and all(a in (2, 3) and b in (0, 1) and kind == "dist" for a, b, kind in backward)
    assert all(r["transports"] == reports[0]["transports"] for r in reports)
    # Independent of the runtime's account: only host 1's leader wrote an arena, and only on host 1.
    assert "2_gather" in reports[2]["shm"] and reports[0]["shm"] == reports[1]["shm"] == []
    for report in reports:
        assert report["shm_error"].startswith("transport='shm' needs"), report["shm_error"]
        assert all(name in report["shm_error"] for name in two_hosts.hostnames)

"""A pipelined step equals the same model run unpipelined in one process: loss and every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_utils import run_distributed
from torch import nn
from torch.nn import functional as F

from lightning_grendel.strategies.pipeline import EXECUTORS, Mesh
from lightning_grendel.strategies.pipeline.runtime import PipelineRuntime
from lightning_grendel.strategies.pipeline.schedules import SCHEDULES
from lightning_grendel.strategies.pipeline.stages import Pipeline, PipelineStage


def _stages() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(5, 8), nn.Tanh()), nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 3)]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(10, 5, generator=generator), torch.randint(0, 3, (10,), generator=generator)


def _reference() -> tuple[float, list[list[torch.Tensor]]]:
    modules = _stages()
    x, y = _data()
    loss = F.cross_entropy(nn.Sequential(*modules)(x), y)
    loss.backward()
    return loss.item(), [[p.grad.clone() for p in m.parameters()] for m in modules]


# 3 stages on 4 ranks: stage 1 is data parallel over a (1,2) mesh, so every boundary really reshards.
MESHES = [Mesh([0], (1, 1)), Mesh([1, 2], (1, 2)), Mesh([3], (1, 1))]
SPECS = ["R", "S1", "R"]


def _equivalence(rank: int, world: int) -> int:
    want_loss, want_grads = _reference()
    x, y = _data()
    checked = 0
    for schedule in SCHEDULES:
        for executor in EXECUTORS:
            modules = _stages()
            pipeline = Pipeline([PipelineStage(m, spec) for m, spec in zip(modules, SPECS, strict=True)],
                                F.cross_entropy)
            runtime = PipelineRuntime(pipeline, MESHES, schedule=schedule, executor=executor, num_microbatches=3)
            loss = runtime.step(x, y)
            runtime.close()
            assert torch.allclose(loss, torch.tensor(want_loss), rtol=1e-5, atol=0), (schedule, executor)
            for got, want in zip(modules[runtime.stage].parameters(), want_grads[runtime.stage], strict=True):
                assert got.grad is not None
                torch.testing.assert_close(got.grad, want, rtol=1e-5, atol=1e-7)
                checked += 1
            others = [m for i, m in enumerate(modules) if i != runtime.stage]
            assert all(p.grad is None for m in others for p in m.parameters())
    dist.barrier()
    return checked


@pytest.mark.timeout(300)
def test_pipelined_step_equals_unpipelined_for_every_schedule_and_executor():
    assert all(n > 0 for n in run_distributed(_equivalence, 4, timeout_s=120))

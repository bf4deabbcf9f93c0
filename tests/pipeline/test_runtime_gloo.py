"""A pipelined step equals the same model run unpipelined in one process: loss and every gradient.

Three stages on six ranks: the middle stage runs on a (2,2) mesh, data parallel over axis 0 and with
a column-parallel Linear over axis 1, so activations go 1 -> (rows over 2, replicated over 2) and
(rows over 2, features over 2) -> 1 through cross-mesh resharding, and gradients come back. The
interleaved schedule runs six chunks on the same three meshes (two per mesh, chunk c on mesh c mod 3),
so the last mesh also hands its chunk's output back to the first. The V schedules (``zbv``,
``dualpipev``) place them 0 1 2 2 1 0: the turn stays on the last mesh (no transfer), and a second
run puts the turn on the (2,2) mesh, data parallel, so the in-process hand-over splits samples there.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from lightning_grendel.pipeline.residency import StageResidency
from lightning_grendel.pipeline.runtime import PipelineRuntime
from lightning_grendel.pipeline.schedules import SCHEDULES, chunk_stages
from lightning_grendel.pipeline.stages import Pipeline, PipelineStage
from lightning_grendel.resharding import EXECUTORS, Mesh
from tests.helpers.distributed import run_distributed

MESHES = [Mesh([0], (1, 1)), Mesh([1, 2, 3, 4], (2, 2)), Mesh([5], (1, 1))]
V_TURN_MESHES = [Mesh([0], (1, 1)), Mesh([5], (1, 1)), Mesh([1, 2, 3, 4], (2, 2))]  # the V turns on (2,2)
LR = 0.1


def _stages(virtual: int = 1) -> list[nn.Module]:
    torch.manual_seed(0)
    widths = [(5, 8, 7), (6, 6, 5)][:virtual]
    ends = [w[0] for w in widths[1:]] + [3]
    modules = []
    for (first, middle, out), end in zip(widths, ends, strict=True):
        modules += [nn.Sequential(nn.Linear(first, middle), nn.Tanh()),
                    nn.Sequential(nn.Linear(middle, middle), nn.Tanh(), nn.Linear(middle, out)),
                    nn.Sequential(nn.Tanh(), nn.Linear(out, end))]
    return modules


def _pipeline(modules: list[nn.Module], sharded: tuple[int, ...] = ()) -> Pipeline:
    """Every third stage column parallel; the ``sharded`` ones data parallel (samples over mesh axis 0)."""
    return Pipeline([PipelineStage(m, "S0", column_parallel="2") if i % 3 == 1 else
                     PipelineStage(m, "S0" if i in sharded else "R") for i, m in enumerate(modules)], F.cross_entropy)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(12, 5, generator=generator), torch.randint(0, 3, (12,), generator=generator)


def _reference(virtual: int) -> tuple[float, list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    modules = _stages(virtual)
    x, y = _data()
    loss = F.cross_entropy(nn.Sequential(*modules)(x), y)
    loss.backward()
    grads = [[p.grad.clone() for p in m.parameters()] for m in modules]
    stepped = [[(p - LR * p.grad).detach() for p in m.parameters()] for m in modules]
    return loss.item(), grads, stepped


def _equivalence(rank: int, world: int, schedules, executors, sender_mode, transports, meshes=MESHES,
                 sharded: tuple[int, ...] = ()) -> int:
    x, y = _data()
    checked = 0
    for schedule, executor, transport in itertools.product(schedules, executors, transports):
        virtual = 2 if SCHEDULES[schedule].virtual else 1
        want_loss, want_grads, want_stepped = _reference(virtual)
        modules = _stages(virtual)
        runtime = PipelineRuntime(_pipeline(modules, sharded), meshes, schedule=schedule, executor=executor,
                                  sender_mode=sender_mode, num_microbatches=max(3, 3 * SCHEDULES[schedule].min_rounds),
                                  transport=transport)
        residency = StageResidency(nn.ModuleList(modules), modules, runtime.chunk_meshes, rank)
        residency.release()  # the step must not need other chunks' weights
        mine = runtime.chunks
        assert all((p.numel() == 0) == (c not in mine) for c, m in enumerate(modules) for p in m.parameters())
        loss = runtime.step((x, y))
        assert torch.allclose(loss, torch.tensor(want_loss), rtol=1e-5, atol=0), (schedule, executor, transport)
        assert mine == [c for c, s in enumerate(chunk_stages(schedule, 3, virtual)) if s == runtime.stage]
        # The column-parallel Linear's rows are computed on one TP rank each; the stage reduction
        # leaves the full gradient on every rank of the stage, so every parameter compares in full.
        for c in mine:
            for got, want in zip(modules[c].parameters(), want_grads[c], strict=True):
                torch.testing.assert_close(got.grad, want, rtol=1e-5, atol=1e-7, msg=f"{schedule} chunk {c}")
                checked += 1
        others = [m for i, m in enumerate(modules) if i not in mine]
        assert all(p.grad is None for m in others for p in m.parameters())
        with torch.no_grad():  # a plain SGD step on what this rank owns, then gather every chunk
            for c in mine:
                for p in modules[c].parameters():
                    p -= LR * p.grad
        state = residency.state_dict(dst=0)  # rank 0 gets every chunk's weights from its owner
        if rank == 0:
            flat = [value for module, want in zip(modules, want_stepped, strict=True) for value in want]
            for got, value in zip(state.values(), flat, strict=True):
                torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6)
        residency.materialize()  # every rank gets every chunk back
        for module, want in zip(modules, want_stepped, strict=True):
            for got, value in zip(module.parameters(), want, strict=True):
                torch.testing.assert_close(got.detach(), value, rtol=1e-5, atol=1e-6)
        runtime.close()
    dist.barrier()
    return checked


def _lorentz_model():
    from lightning_grendel.pipeline.examples.lorentz_seq import PipelinedLorentzClassifier

    torch.manual_seed(0)
    return PipelinedLorentzClassifier(stage_splits=[1], stage_input_specs=["S0", "S0"], vocab_size=6, num_classes=4,
                                      max_len=8, d_model=8, heads=2, num_layers=2, d_ff=16)


def _lorentz_equivalence(rank: int) -> None:
    """The package's Lorentz transformer in 2 stages, both data parallel, the second with replicas."""
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(2, 6, (12, 8), generator=generator)
    tokens[::3, 5:] = 0  # padding at the end of some rows
    labels = torch.randint(0, 4, (12,), generator=generator)
    reference = _lorentz_model()
    want = F.cross_entropy(reference.model(tokens, tokens == 0), labels)
    want.backward()
    model = _lorentz_model()
    pipeline = model.pipeline_stages()
    runtime = PipelineRuntime(pipeline, [Mesh([0, 1], (2, 1)), Mesh([2, 3, 4, 5], (2, 2))], num_microbatches=3)
    loss = runtime.step((tokens, labels))
    runtime.close()
    assert torch.allclose(loss, want.detach(), rtol=1e-5, atol=0)
    mine = {id(p) for p in pipeline.stages[runtime.stage].module.parameters() if p.requires_grad}
    for (name, got), want_p in zip(model.named_parameters(), reference.parameters(), strict=True):
        if id(got) in mine:
            torch.testing.assert_close(got.grad, want_p.grad, rtol=1e-5, atol=1e-6, msg=name)


def _all_equivalences(rank: int, world: int) -> int:
    checked = _equivalence(rank, world, SCHEDULES, EXECUTORS, "normal", ("dist",))
    checked += _equivalence(rank, world, SCHEDULES, ("broadcast",), "normal", ("shm",))
    checked += _equivalence(rank, world, ("zb_h1", "interleaved_1f1b"), ("auto",), "auto", ("dist", "shm"))
    checked += _equivalence(rank, world, ("zbv", "dualpipev"), ("broadcast",), "normal", ("dist",), V_TURN_MESHES,
                            sharded=(2, 3))
    runtime = PipelineRuntime(_pipeline(_stages(2), sharded=(2,)), V_TURN_MESHES, schedule="zbv", transport="dist")
    with pytest.raises(ValueError, match=r"stages 2 and 3 both run on stage mesh 2 \(the turn of schedule 'zbv'"):
        runtime.step(_data())  # samples split at the turn but not after it: refused on every rank, no hang
    runtime.close()
    _lorentz_equivalence(rank)  # the defaults: broadcast, normal senders, transport auto
    return checked


@pytest.mark.timeout(300)
def test_pipelined_step_equals_unpipelined_for_every_schedule_and_executor():
    """Every schedule (interleaved and V with two chunks per mesh) and executor over gloo, every schedule
    through shared memory, executor="auto" on both transports, the V schedules turning on the (2,2) mesh;
    plus the Lorentz transformer recipe's model (default executor and transport), in the same processes
    (start-up dominates here)."""
    results = run_distributed(_all_equivalences, 6, timeout_s=220)
    assert all(n > 0 for n in results)

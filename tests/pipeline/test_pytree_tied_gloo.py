"""Pytrees between stages, sample-share loss weights, and a weight tied across meshes of different shapes.

Five gloo ranks, three stages: stage 0 on a (1,2) mesh with the samples over axis 1, stage 1 on one
rank, stage 2 on a (2,1) mesh with the samples over axis 0. Stage 0 embeds token ids and hands on a
dict (activations, the int ids, a plain int); stage 2 projects with the embedding matrix (tied, in
two meshes of different shapes) and returns a flattened ``[B*T, V]`` output, so the loss weights can
only be right if they come from the batch's sample count. The reference is the same model run
unpipelined in one process: the loss, every gradient, and the tied weight's gradient (the sum of
both uses) on every rank holding it; and forward-only evaluation's outputs, gathered from the ranks
that hold each block of samples. An error on one rank only is raised on every rank, naming it. The
V schedules run four chunks on two meshes: the embedding and its tied head both on the (1,2) mesh,
the turn on a (3,1) data-parallel mesh handing its pytree over in-process (training and evaluation).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from lightning_grendel.pipeline.pytree import Layout, input_layout, split_microbatches
from lightning_grendel.pipeline.runtime import PipelineRuntime, PipelineStepError
from lightning_grendel.pipeline.stages import Pipeline, PipelineStage
from lightning_grendel.pipeline.tied import tie_parameters
from lightning_grendel.resharding import Mesh
from tests.helpers.distributed import run_distributed

VOCAB, WIDTH, LENGTH = 11, 6, 3
MESHES = [Mesh([0, 1], (1, 2)), Mesh([2], (1, 1)), Mesh([3, 4], (2, 1))]


class _Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(VOCAB, WIDTH))

    def forward(self, ids: torch.Tensor) -> dict:
        return {"h": F.embedding(ids, self.weight), "ids": ids, "n": 3}


class _Block(nn.Module):
    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.lin = nn.Linear(width, WIDTH)

    def forward(self, x: dict) -> tuple:
        return torch.tanh(self.lin(x["h"])) * x["n"], x["ids"] % 2, x["n"]


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(VOCAB, WIDTH))  # tied to the embedding by the pipeline
        self.bias = nn.Parameter(torch.randn(VOCAB))

    def forward(self, x: tuple) -> torch.Tensor:
        h, parity, n = x
        logits = h @ self.weight.t() + self.bias + parity.unsqueeze(-1) / n
        return logits.reshape(-1, VOCAB)  # [B*T, V]: the leading dim is not the sample count


class _Relay(_Block):
    """A block taking what a block hands on (a tuple), so blocks can follow each other."""

    def forward(self, x: tuple) -> tuple:
        h, parity, n = x
        return torch.tanh(self.lin(h)), parity, n


def _modules(block_width: int = WIDTH) -> list[nn.Module]:
    torch.manual_seed(0)
    return [_Embed(), _Block(block_width), _Head()]


def _batch(samples: int = 10) -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (samples, LENGTH), generator=generator)
    return {"ids": ids, "target": torch.randint(0, VOCAB, (samples, LENGTH), generator=generator), "tag": "plain"}


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target.reshape(-1))


def _pipeline(modules: list[nn.Module]) -> Pipeline:
    stages = [PipelineStage(modules[0], "S1"), PipelineStage(modules[1]),
              PipelineStage(modules[2], ("S0", "S0", "R"))]
    return Pipeline(stages, _loss, inputs=lambda batch: batch["ids"], target=lambda batch: batch["target"],
                    tied=[["0.weight", "2.weight"]])


def _reference() -> tuple[float, list[dict[str, torch.Tensor]]]:
    modules = _modules()
    modules[2].weight = modules[0].weight
    batch = _batch()
    loss = _loss(modules[2](modules[1](modules[0](batch["ids"]))), batch["target"])
    loss.backward()
    return loss.item(), [{n: p.grad.clone() for n, p in m.named_parameters()} for m in modules]


V_MESHES = [Mesh([0, 1], (1, 2)), Mesh([2, 3, 4], (3, 1))]


def _v_schedules(rank: int) -> int:
    """Embedding, block, relay, head in a V: meshes 0 1 1 0, so the tied pair shares mesh 0."""
    torch.manual_seed(0)
    reference = [_Embed(), _Block(), _Relay(), _Head()]
    reference[3].weight = reference[0].weight
    batch = _batch(12)  # 4 micro-batches of 3 samples, one per rank of the (3,1) mesh
    loss = _loss(reference[3](reference[2](reference[1](reference[0](batch["ids"])))), batch["target"])
    loss.backward()
    checked = 0
    for schedule, microbatches in (("zbv", 3), ("dualpipev", 4)):
        torch.manual_seed(0)
        modules = [_Embed(), _Block(), _Relay(), _Head()]
        stages = [PipelineStage(modules[0], "S1"), PipelineStage(modules[1], "S0"),
                  PipelineStage(modules[2], "S0"), PipelineStage(modules[3], ("S1", "S1", "R"))]
        pipeline = Pipeline(stages, _loss, inputs=lambda batch: batch["ids"], target=lambda batch: batch["target"],
                            tied=[["0.weight", "3.weight"]])
        runtime = PipelineRuntime(pipeline, V_MESHES, schedule=schedule, num_microbatches=microbatches)
        got = runtime.step(batch)
        found = runtime.evaluate(batch, lambda output, rows: output)  # forward only, through the V and its turn
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, [(start, value) for _, start, _, value in found] if runtime.contributes()
                               else [])
        runtime.close()
        torch.testing.assert_close(got, loss.detach(), rtol=1e-5, atol=0)
        outputs = torch.cat([value for _, value in sorted((p for part in parts for p in part), key=lambda p: p[0])])
        with torch.no_grad():
            want = reference[3](reference[2](reference[1](reference[0](batch["ids"]))))
        torch.testing.assert_close(outputs, want, rtol=1e-5, atol=1e-6)
        assert runtime.chunks == ([0, 3] if rank < 2 else [1, 2])
        for c in runtime.chunks:
            for (name, p), want in zip(modules[c].named_parameters(), reference[c].parameters(), strict=True):
                torch.testing.assert_close(p.grad, want.grad, rtol=1e-5, atol=1e-6, msg=f"{schedule} {c} {name}")
                checked += 1
    return checked


def _run(rank: int, world: int) -> int:
    bad = Pipeline([PipelineStage(m) for m in _modules(block_width=WIDTH + 1)], _loss,
                   inputs=lambda batch: batch["ids"], target=lambda batch: batch["target"])
    runtime = PipelineRuntime(bad, MESHES, num_microbatches=3)
    with pytest.raises(ValueError, match="stage 1 cannot take its input"):  # on every rank, before any transfer
        runtime.step(_batch())
    runtime.close()

    want_loss, want_grads = _reference()
    checked = 0
    for schedule in ("1f1b", "zb_h1"):
        modules = _modules()
        runtime = PipelineRuntime(_pipeline(modules), MESHES, schedule=schedule, num_microbatches=3)
        assert modules[2].weight is modules[0].weight
        loss = runtime.step(_batch())
        runtime.close()
        torch.testing.assert_close(loss, torch.tensor(want_loss), rtol=1e-5, atol=0)
        for c in runtime.chunks:
            for name, p in modules[c].named_parameters():
                torch.testing.assert_close(p.grad, want_grads[c][name], rtol=1e-5, atol=1e-6,
                                           msg=f"{schedule} stage {c} {name} rank {rank}")
                checked += 1
        if rank in (0, 1, 3, 4):  # both holders of the tied weight have the whole gradient
            torch.testing.assert_close(modules[0].weight.grad, want_grads[0]["weight"], rtol=1e-5, atol=1e-6)

    modules = _modules()  # forward-only: the last stage's two ranks each return their samples' outputs
    runtime = PipelineRuntime(_pipeline(modules), MESHES, num_microbatches=3)
    found = runtime.evaluate(_batch(), lambda output, rows: (output, rows["target"].shape[0]))
    parts: list = [None] * world
    dist.all_gather_object(parts, [(start, stop, value) for _, start, stop, value in found] if runtime.contributes()
                           else [])
    runtime.close()
    pieces = sorted(piece for part in parts for piece in part)
    assert [(a, b) for a, b, _ in pieces] == [(0, 2), (2, 4), (4, 6), (6, 7), (7, 9), (9, 10)]
    assert all(stop - start == samples for start, stop, (_, samples) in pieces)
    with torch.no_grad():
        want = modules[2](modules[1](modules[0](_batch()["ids"])))
    torch.testing.assert_close(torch.cat([output for _, _, (output, _) in pieces]), want, rtol=1e-5, atol=1e-6)
    _one_rank_fails(rank, want_loss)
    checked += _v_schedules(rank)
    dist.barrier()
    return checked


class _FailingBackward(_Block):
    """Its output's gradient hook raises on rank 2: an error inside one rank's backward."""

    def forward(self, x: dict) -> tuple:
        out = super().forward(x)
        if not out[0].is_meta and dist.get_rank() == 2:
            out[0].register_hook(_raise_in_backward)
        return out


def _raise_in_backward(grad: torch.Tensor) -> None:
    raise FloatingPointError("NaN in a gradient")


class _Restructuring(_Block):
    """Hands on a list instead of a tuple from its second real call on: a structure change on its own rank."""

    calls = 0

    def forward(self, x: dict) -> tuple | list:
        out = super().forward(x)
        if x["h"].is_meta:  # the layout pass
            return out
        self.calls += 1
        return out if self.calls < 2 else list(out)


def _one_rank_fails(rank: int, want_loss: float) -> None:
    """An error on one rank (a structure change on the sender, a backward raising, a loss or an evaluation
    step raising on one rank of the last stage) is raised on every rank, naming that rank, never a hang."""
    modules = _modules()
    modules[1] = _Restructuring()
    runtime = PipelineRuntime(_pipeline(modules), MESHES, schedule="1f1b", num_microbatches=3)
    with pytest.raises(PipelineStepError, match=r"failed on rank 2 \(stage 1, forward of micro-batch 1\): "
                                                "ValueError: stage 1 output changed structure"):
        runtime.step(_batch())
    runtime.close()

    modules = _modules()
    modules[1] = _FailingBackward()
    runtime = PipelineRuntime(_pipeline(modules), MESHES, schedule="1f1b", num_microbatches=3)
    with pytest.raises(PipelineStepError, match=r"failed on rank 2 \(stage 1, backward of micro-batch 0\): "
                                                "FloatingPointError: NaN in a gradient"):
        runtime.step(_batch())
    runtime.close()

    failing = {"rank": 4}

    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if dist.get_rank() == failing["rank"]:
            raise KeyError("no such target")
        return _loss(output, target)

    modules = _modules()
    pipeline = _pipeline(modules)
    pipeline.loss = loss
    runtime = PipelineRuntime(pipeline, MESHES, schedule="zb_h1", num_microbatches=3)
    with pytest.raises(PipelineStepError, match=r"failed on rank 4 \(stage 2, forward of micro-batch 0\): "
                                                "KeyError: 'no such target'"):
        runtime.step(_batch())

    def evaluate(output: torch.Tensor, rows: dict) -> None:
        if dist.get_rank() == 3:
            raise RuntimeError("evaluation step failed")

    with pytest.raises(PipelineStepError, match=r"failed on rank 3 \(stage 2, forward of micro-batch 0\)"):
        runtime.evaluate(_batch(), evaluate)
    failing["rank"] = None  # the runtime goes on: the next step is the plain model's
    torch.testing.assert_close(runtime.step(_batch()), torch.tensor(want_loss), rtol=1e-5, atol=0)
    runtime.close()


@pytest.mark.timeout(300)
def test_pytrees_flattened_outputs_and_tied_weight_across_mesh_shapes():
    results = run_distributed(_run, 5, timeout_s=120)
    assert all(n > 0 for n in results)


def test_bad_boundaries_are_named():
    mesh = Mesh([0, 1], (1, 2))
    tree = {"x": torch.zeros(4, 3), "mask": torch.zeros(5, 5)}
    with pytest.raises(ValueError, match=r"input leaf \['mask'\] has first dim 5 but the micro-batch has 4"):
        input_layout(tree, "S1", mesh, 4, "stage 2")
    layout, axes = input_layout(tree, {"x": "S1", "mask": "R"}, mesh, 4, "stage 2")
    assert axes == (1,)
    with pytest.raises(ValueError, match="does not match the input's structure"):
        input_layout(tree, ("S1", "R"), mesh, 4, "stage 2")
    with pytest.raises(ValueError, match="stage 2 output changed structure"):
        layout.check([tree["x"], tree["mask"]], mesh, 0, "stage 2 output")
    with pytest.raises(ValueError, match=r"leaf \['x'\] is \(\(4, 3\), torch.float32\) on rank 0"):
        layout.check(tree, mesh, 0, "stage 2 output")
    assert isinstance(layout, Layout)
    batch = {"a": torch.zeros(5, 2), "b": [torch.ones(5)], "c": 1.5, "d": torch.tensor(2)}
    micro, counts = split_microbatches(batch, 2)
    assert counts == [3, 2] and micro[1]["c"] == 1.5 and micro[1]["b"][0].shape == (2,)
    with pytest.raises(ValueError, match="disagree on the sample count"):
        split_microbatches((torch.zeros(4, 2), torch.zeros(3)), 2)
    stages = _modules()
    stages[2].weight = nn.Parameter(torch.zeros(VOCAB + 1, WIDTH))
    with pytest.raises(ValueError, match="differ in shape"):
        tie_parameters(stages, [["0.weight", "2.weight"]])
    with pytest.raises(ValueError, match="did you mean"):
        tie_parameters(stages, [["0.weight", "2.wieght"]])

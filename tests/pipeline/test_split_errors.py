"""Bad input to automatic splits and to the module-step glue: one clear error each, in one process.

Also checks what a split is made of: every parameter in exactly one stage (the tied one in both),
the model's own tensors, and the split stages giving the eager forward's output and gradients.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.nn import functional as F

from lightning_grendel.pipeline.module_steps import Combined, ModuleSteps
from lightning_grendel.pipeline.split import TracedPipeline


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.body, self.extra = nn.Embedding(7, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.head = nn.Linear(4, 7)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids: torch.Tensor, scale: float = 1.0) -> dict:
        h = self.embed(ids) * scale
        return {"logits": self.head(torch.tanh(self.body(h))), "hidden": h}


def test_split_stages_hold_the_model_tensors_and_compute_its_forward():
    net = _Net()
    traced = TracedPipeline(net, ["body", "head"])
    ids = torch.randint(0, 7, (3, 5))
    x = traced.stage_input((ids,), {"scale": 2.0})
    assert x[0] == "train0" and len(x) == 2
    for stage in traced.stages:
        x = stage(x)
    want = net(ids, scale=2.0)
    torch.testing.assert_close(x["logits"], want["logits"])
    x["logits"].sum().backward()
    got = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    want["logits"].sum().backward()
    for name, p in net.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, msg=name)
    owners = [{id(p) for p in stage.parameters()} for stage in traced.stages]
    assert id(net.embed.weight) in owners[0] and id(net.embed.weight) in owners[2]
    assert id(net.body.weight) in owners[1] and id(net.extra.weight) not in set().union(*owners)
    assert traced.stage_input((ids,), {"scale": 3.0})[0] == "train1"  # another constant: another trace


class _DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.drop, self.down = nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.drop(torch.tanh(self.up(x))))


def test_a_model_with_dropout_splits_in_training_mode():
    """The trace check replays the eager forward's random draws: dropout is not taken for a wrong trace,
    and the split stages draw the masks the eager forward draws from the same seed."""
    torch.manual_seed(0)
    net, x = _DropoutNet(), torch.randn(6, 4)
    traced = TracedPipeline(net, ["down"])
    out = traced.stage_input((x,), {})
    torch.manual_seed(1)
    for stage in traced.stages:
        out = stage(out)
    torch.manual_seed(1)
    torch.testing.assert_close(out, net(x))
    assert (out != net(x)).any()  # another draw, other masks: the comparison above did see dropout


def test_bad_split_points_are_named():
    with pytest.raises(ValueError, match=r"split point 'bdy' names no submodule of _Net; did you mean \['body'"):
        TracedPipeline(_Net(), ["bdy"])
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="split point 'extra' is called 0 times"):
        TracedPipeline(_Net(), ["extra"]).stage_input((ids,), {})
    with pytest.raises(ValueError, match="cut the model into 1 stages, not 2"):
        TracedPipeline(_Net(), ["embed"]).stage_input((ids,), {})

    class Twice(_Net):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(self.body(self.embed(ids))))

    with pytest.raises(ValueError, match="split point 'body' is called 2 times"):
        TracedPipeline(Twice(), ["body"]).stage_input((ids,), {})

    class Cache(_Net):
        def forward(self, ids: torch.Tensor) -> tuple:
            return self.head(self.body(self.embed(ids))), object()

    with pytest.raises(ValueError, match="forward returned a object"):
        TracedPipeline(Cache(), ["body"]).stage_input((ids,), {})

    class Branch(_Net):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.body(self.embed(ids))
            return self.head(h * 2 if ids.sum() > 2 else h)

    traced = TracedPipeline(Branch(), ["body"])
    x = traced.stage_input((torch.ones(2, 3, dtype=torch.long),), {})
    traced.stages[1](traced.stages[0](x))  # the traced branch
    x = traced.stage_input((torch.zeros(2, 3, dtype=torch.long),), {})
    with pytest.raises(ValueError, match="this input takes another branch"):
        traced.stages[1](traced.stages[0](x))


class _Module(LightningModule):
    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls = calls
        self.layer = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        outputs = [self(x) for _ in range(self.calls)]
        loss = 0.5 * self.layer.bias.square().sum() + (F.cross_entropy(outputs[0], y) if outputs else 0.0)
        self.log("loss", loss)
        self.log("peak", loss, reduce_fx="max")
        return loss


def _steps(calls: int, inputs, batch) -> ModuleSteps:
    steps = ModuleSteps(_Module(calls), None, inputs)
    steps.begin("training_step", batch, 0)
    return steps


def test_module_steps_capture_replay_and_refuse():
    batch = (torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))
    steps = _steps(1, lambda b: b[0], batch)
    assert steps.first_input(batch) is batch[0]
    output = torch.zeros(4, 3)
    loss = steps.loss(output, batch)  # the step's own loss on the given output, with its extra term
    assert torch.isclose(loss, F.cross_entropy(output, batch[1]) + 0.5 * steps.module.layer.bias.square().sum())
    assert steps.logs.values["loss"][0] == "mean" and steps.logs.values["peak"][0] == "max"
    with pytest.raises(ValueError, match="other arguments than the first stage's input"):
        _steps(1, lambda b: b[1], batch).first_input(batch)
    with pytest.raises(ValueError, match="never called forward"):
        _steps(0, lambda b: b[0], batch).first_input(batch)
    twice = _steps(2, lambda b: b[0], batch)
    twice.loss(output, batch)  # the step finishes (other ranks wait on it); check() raises on every rank
    assert twice.problems and "called forward 2 times" in twice.problems[0]
    assert "forward" not in twice.module.__dict__ and "log" not in twice.module.__dict__  # patches undone


def test_logged_values_combine_by_sample_share():
    combined = Combined()
    combined.add("loss", torch.tensor(2.0), 0.75)
    combined.add("loss", 4.0, 0.25)
    combined.add("peak", torch.tensor(2.0), 0.75, reduce="max")
    combined.add("peak", torch.tensor(5.0), 0.25, reduce="max")
    assert combined.values["loss"][1] == pytest.approx(2.5) and combined.values["peak"][1] == 5.0
    with pytest.raises(ValueError, match="'mean', 'sum', 'max' or 'min' only"):
        combined.add("odd", 1.0, 1.0, reduce=torch.median)
    with pytest.raises(ValueError, match="log scalar tensors or numbers"):
        combined.add("vector", torch.ones(3), 1.0)

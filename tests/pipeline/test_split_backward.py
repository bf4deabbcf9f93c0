"""ZB-H1's split backward: B + W give the fused backward's gradients, and W does not redo B's work."""

from __future__ import annotations

import torch
from torch import nn

from lightning_grendel.pipeline.examples.tiny_lm import CausalBlock
from lightning_grendel.pipeline.split_backward import input_gradient


class _CountedIdentity(torch.autograd.Function):
    """Identity whose backward counts its calls: it sits on the input path only."""

    calls = 0

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        _CountedIdentity.calls += 1
        return grad


class _Awkward(nn.Module):
    """A weight used twice on the input path, a parameter the input never meets, two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.block = CausalBlock(6, 2)
        self.offset = nn.Parameter(torch.randn(6))
        self.alone = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.shared(torch.tanh(self.shared(x)))
        return self.block(_CountedIdentity.apply(h)) + self.offset, self.alone * 2


def _gradients(module: nn.Module, x: torch.Tensor, grads: list[torch.Tensor], split: bool):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    outs = list(module(x)) if isinstance(module, _Awkward) else [module(x)]
    params = list(module.parameters())
    _CountedIdentity.calls = 0
    if split:
        (x_grad,), weight = input_gradient([x], outs, grads, params)
        before = [p.grad for p in params]
        weight.run()
        assert all(g is None for g in before), "B must not touch the weights' gradients"
    else:
        torch.autograd.backward(outs, grads)
        x_grad = x.grad
    return x_grad, [p.grad for p in params], _CountedIdentity.calls


def test_split_backward_equals_fused_backward():
    torch.manual_seed(0)
    blocks = nn.Sequential(CausalBlock(8, 2), CausalBlock(8, 2)).double()
    cases = [(blocks, (2, 5, 8)), (_Awkward().double(), (2, 4, 6))]
    for module, shape in cases:
        x = torch.randn(shape, dtype=torch.float64)
        with torch.no_grad():
            outs = module(x)
        outs = list(outs) if isinstance(outs, tuple) else [outs]
        grads = [torch.randn_like(y) for y in outs]
        fused_x, fused, _ = _gradients(module, x, grads, split=False)
        split_x, split, calls = _gradients(module, x, grads, split=True)
        torch.testing.assert_close(split_x, fused_x, rtol=1e-12, atol=1e-12)
        for (name, _), a, b in zip(module.named_parameters(), split, fused, strict=True):
            assert a is not None, name
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
        if isinstance(module, _Awkward):
            # The counted node lies on the input path above the shared Linear: B walks through it once; W starts
            # at the weights' entries (the shared Linear's is below it) and does not walk it again.
            assert calls == 1


def test_first_chunk_weight_pass_is_the_whole_backward():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    ids = torch.randint(0, 10, (2, 5))
    out = module(ids)
    grad = torch.randn_like(out)
    assert input_gradient([], [out], [grad], list(module.parameters()))[0] == []
    reference = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    reference.load_state_dict(module.state_dict())
    torch.autograd.backward(reference(ids), grad)
    _, weight = input_gradient([], [module(ids)], [grad], list(module.parameters()))
    weight.run()
    for a, b in zip(module.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)

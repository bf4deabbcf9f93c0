"""LorentzRiemannianAdam against geoopt's RiemannianAdam, step by step: the fused C++ pass and the
reference path, both retractions, stabilize settings, weight decay, parameters without gradients."""

from __future__ import annotations

import geoopt
import pytest
import torch

from lightning_grendel.hyperbolic import cpp
from lightning_grendel.hyperbolic.manifold import LorentzManifold
from lightning_grendel.hyperbolic.optim import LorentzRiemannianAdam
from tests.helpers.hyperbolic import assert_on_hyperboloid

needs_kernel = pytest.mark.skipif(cpp.load(cpp.LORENTZ_ADAM) is None, reason="the C++ Lorentz Adam did not build")


def _params(dtype, retraction, dim=9, k=2.0):
    """Two hyperboloid tables (one farther from the origin, x0 up to ~10) and a Euclidean matrix, fixed
    by a seed (drawn in float64 for every dtype)."""
    torch.manual_seed(1)
    manifold = LorentzManifold(k, max_norm=1.5, retraction=retraction)
    near = geoopt.ManifoldParameter(manifold.random_normal(40, dim, dtype=torch.float64).to(dtype), manifold=manifold)
    free = LorentzManifold(k, retraction=retraction)  # no max_norm
    far = geoopt.ManifoldParameter(free.random_normal(7, dim, std=2.0 / dim**0.5, dtype=torch.float64).to(dtype),
                                   manifold=free)
    plain = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64).to(dtype))
    return [near, far, plain]


def _run(optimizer_cls, params, steps, gradient_every=(1, 2, 1), **kwargs):
    """``steps`` steps of a fixed random linear-quadratic loss; parameter i gets a gradient every
    ``gradient_every[i]`` steps (None otherwise)."""
    optimizer = optimizer_cls(params, lr=0.05, **kwargs)
    g = torch.Generator().manual_seed(2)
    for step in range(steps):
        targets = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for p in params]
        optimizer.zero_grad()
        pairs = zip(params, targets, gradient_every, strict=True)
        loss = sum((p * t).sum() + 0.1 * (p * p * t).sum() for p, t, every in pairs if step % every == 0)
        loss.backward()
        optimizer.step()
    return optimizer


def _assert_same(params_a, opt_a, params_b, opt_b, atol, rtol=1e-9):
    for a, b in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), atol=atol, rtol=rtol)
        for key in ("exp_avg", "exp_avg_sq"):  # ours keeps a Lorentz table's second moment once per row
            ours, theirs = opt_a.state[a][key], opt_b.state[b][key]
            torch.testing.assert_close(ours.expand_as(theirs), theirs, atol=atol, rtol=rtol)
        assert opt_a.state[a]["step"] == opt_b.state[b]["step"]


@pytest.mark.parametrize("kernel", [pytest.param(True, marks=needs_kernel), False], ids=["kernel", "reference"])
@pytest.mark.parametrize("retraction", ["expmap", "projection"])
@pytest.mark.parametrize("stabilize,weight_decay", [(None, 0.0), (1, 0.0), (3, 0.1)])
def test_matches_geoopt_step_by_step(kernel, retraction, stabilize, weight_decay):
    """float64, 12 steps, one parameter without a gradient every other step (geoopt then still
    stabilizes it with its group)."""
    ours, theirs = _params(torch.float64, retraction), _params(torch.float64, retraction)
    opt_ours = _run(LorentzRiemannianAdam, ours, 12, stabilize=stabilize, weight_decay=weight_decay, kernel=kernel)
    opt_theirs = _run(geoopt.optim.RiemannianAdam, theirs, 12, stabilize=stabilize, weight_decay=weight_decay)
    _assert_same(ours, opt_ours, theirs, opt_theirs, atol=1e-11)
    assert_on_hyperboloid(ours[0].detach(), 2.0)
    assert ours[0].detach()[:, 1:].norm(dim=-1).max() <= 1.5 + 1e-12 or stabilize is None


@needs_kernel
@pytest.mark.parametrize("retraction", ["expmap", "projection"])
@pytest.mark.parametrize("dim", [4, 32])
def test_float32_kernel_is_as_accurate_as_geoopt(retraction, dim):
    """In float32 (at the table width the kernel specialises, 32, and another), both implementations
    against geoopt in float64 from the same start: the kernel's error is of the size of geoopt's own."""
    runs = {}
    for name, cls, dtype in (("ours", LorentzRiemannianAdam, torch.float32),
                             ("geoopt", geoopt.optim.RiemannianAdam, torch.float32),
                             ("exact", geoopt.optim.RiemannianAdam, torch.float64)):
        runs[name] = _params(dtype, retraction, dim=dim)
        _run(cls, runs[name], 3, stabilize=1)
    for ours, theirs, exact in zip(runs["ours"], runs["geoopt"], runs["exact"], strict=True):
        error_ours = (ours.detach().double() - exact.detach()).abs().max().item()
        error_theirs = (theirs.detach().double() - exact.detach()).abs().max().item()
        assert error_ours <= max(4 * error_theirs, 1e-5), (error_ours, error_theirs)


def test_amsgrad_takes_the_reference_path():
    ours, theirs = _params(torch.float64, "expmap"), _params(torch.float64, "expmap")
    opt_ours = _run(LorentzRiemannianAdam, ours, 6, amsgrad=True, stabilize=2)
    opt_theirs = _run(geoopt.optim.RiemannianAdam, theirs, 6, amsgrad=True, stabilize=2)
    _assert_same(ours, opt_ours, theirs, opt_theirs, atol=1e-11)


@needs_kernel
@pytest.mark.parametrize("first", ["geoopt", "ours"])
def test_each_continues_from_the_others_state(first):
    """4 steps with one optimiser, its state loaded into the other, 1 more step: as if one had run all 5."""
    classes = {"geoopt": geoopt.optim.RiemannianAdam, "ours": LorentzRiemannianAdam}
    second = "ours" if first == "geoopt" else "geoopt"
    straight, switched = _params(torch.float64, "expmap"), _params(torch.float64, "expmap")
    opt_straight = _run(classes[first], straight, 4, stabilize=1)
    opt_before = _run(classes[first], switched, 4, stabilize=1)
    opt_switched = classes[second](switched, lr=0.05, stabilize=1)
    opt_switched.load_state_dict(opt_before.state_dict())
    for state in opt_switched.state.values():  # torch's Adam.__setstate__ made it a float32 tensor, which
        state["step"] = int(state["step"])     # geoopt would put into its bias corrections as it is
    for optimizer, params in ((opt_straight, straight), (opt_switched, switched)):
        for p in params:
            p.grad = torch.ones_like(p) * 0.3
        optimizer.step()
    for a, b in zip(straight, switched, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-11, rtol=1e-9)

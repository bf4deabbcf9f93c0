"""LorentzManifold with geoopt: ManifoldParameter + RiemannianAdam keep points on the hyperboloid."""

from __future__ import annotations

import geoopt
import pytest
import torch

from lightning_grendel.hyperbolic import math as lm
from lightning_grendel.hyperbolic.linear import LorentzLinear
from lightning_grendel.hyperbolic.manifold import LorentzManifold
from lightning_grendel.hyperbolic.optim import LorentzRiemannianAdam
from tests.helpers.hyperbolic import DTYPES, KS, assert_on_hyperboloid, random_points


@pytest.mark.parametrize("optimizer", [geoopt.optim.RiemannianAdam, LorentzRiemannianAdam])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
def test_riemannian_adam_large_lr_1000_steps(k, dtype, optimizer):
    """1000 steps at lr 0.5 pulling points towards far targets: finite gradients, still on the manifold
    (geoopt's RiemannianAdam and the fused one)."""
    torch.manual_seed(0)
    manifold = LorentzManifold(k)
    x = geoopt.ManifoldParameter(manifold.random_normal(8, 5, std=1.0, dtype=dtype), manifold=manifold)
    target = random_points(8, 5, k, dtype, spread=5.0, seed=1)
    opt = optimizer([x], lr=0.5, stabilize=10)
    start = lm.dist(x.detach(), target, k).mean()
    for _ in range(1000):
        opt.zero_grad()
        lm.sqdist(x, target, k).sum().backward()
        assert torch.isfinite(x.grad).all()
        opt.step()
    assert_on_hyperboloid(x.detach(), k)
    assert lm.dist(x.detach(), target, k).mean() < 0.2 * start


def test_learnable_curvature_trains_and_stays_consistent():
    torch.manual_seed(0)
    manifold = LorentzManifold(1.0, learnable=True)
    x = geoopt.ManifoldParameter(manifold.random_normal(16, 4, dtype=torch.float64), manifold=manifold)
    manifold.double()
    target_d = torch.full((16,), 3.0, dtype=torch.float64)
    opt = geoopt.optim.RiemannianAdam([x, manifold.raw_k], lr=0.05, stabilize=1)
    for _ in range(200):
        opt.zero_grad()
        loss = (manifold.dist(x, manifold.origin(16, 4, dtype=torch.float64)) - target_d).pow(2).mean()
        loss.backward()
        assert torch.isfinite(manifold.raw_k.grad)
        opt.step()
        with torch.no_grad():  # a changed k moves the hyperboloid: re-project as a user would
            x.copy_(manifold.projx(x))
    k = manifold.k.item()
    assert k != pytest.approx(1.0)
    assert_on_hyperboloid(x.detach(), k)


def test_manifold_checks_and_parameter_api():
    m = LorentzManifold(2.0, max_norm=1.0)
    x = m.random_normal(4, 3, std=1.0)
    assert m.check_point_on_manifold(x)
    assert not m.check_point_on_manifold(x * 1.1)
    u = m.proju(x, torch.randn(4, 3))
    assert m.check_vector_on_tangent(x, u)
    assert m.projx(x)[:, 1:].norm(dim=-1).max() <= 1.0 + 1e-6
    torch.testing.assert_close(m.norm(x, u), m.inner(x, u).sqrt())
    torch.testing.assert_close(m.dist(x, m.retr(x, u)), m.norm(x, u), rtol=1e-4, atol=1e-4)
    y, v = m.retr_transp(x, u, u)
    assert m.check_vector_on_tangent(y, v, atol=1e-4)
    with pytest.raises(ValueError, match="positive"):
        LorentzManifold(-1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
def test_point_check_tolerance_grows_with_x0_squared(k, dtype):
    """Float32 rounding leaves |<x,x>_L + k| ~ eps * x0^2: such points pass, points off by more still fail."""
    torch.manual_seed(0)
    m = LorentzManifold(k)
    x = m.random_normal(512, 17, std=1.0, dtype=dtype)  # x0 up to ~1e3
    rounded = random_points(512, 17, k, dtype, spread=200.0)  # made in float64, then rounded to dtype
    layer = LorentzLinear(m, 17, 9).to(dtype)
    with torch.no_grad():
        made = [x, rounded, layer(x), layer(rounded), m.projx(rounded * 3), m.expmap(x, m.proju(x, torch.ones_like(x)))]
    for points in made:
        assert m.check_point_on_manifold(points), m.check_point_on_manifold(points, explain=True)
    if dtype == torch.float32:  # geoopt's absolute tolerance (allclose with -k) rejects what rounding alone did
        assert not torch.allclose(lm.inner(rounded, rounded), torch.full((512,), -k), atol=1e-5, rtol=1e-5)

    off = rounded.clone()
    off[-1, 0] *= 1 + 1e-4  # one point's time 1e-4 too large: |<x,x>_L + k| ~ 2e-4 x0^2, 20x the tolerance
    assert not m.check_point_on_manifold(off)
    ok, reason = m.check_point_on_manifold(off, explain=True)
    assert "1 of 512 points fail" in reason
    small = m.origin(3, 17, dtype=dtype)
    small[1, 0] += 1e-3  # near the origin x0^2 = k: the tolerance is geoopt's atol + rtol * k
    assert not m.check_point_on_manifold(small)
    assert not m.check_point_on_manifold(-x)  # the lower sheet
    assert not m.check_point_on_manifold(torch.full_like(x, float("nan")))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
def test_tangent_check_tolerance_grows_with_x0_and_the_vector(k, dtype):
    torch.manual_seed(0)
    m = LorentzManifold(k)
    x = m.random_normal(512, 17, std=1.0, dtype=dtype)
    u = m.proju(x, torch.randn_like(x) * 3)
    y, v = m.retr_transp(x, 0.5 * u / m.norm(x, u, keepdim=True), u)  # a step of length 0.5
    assert m.check_vector_on_tangent(x, u) and m.check_vector_on_tangent(x, m.egrad2rgrad(x, torch.randn_like(x)))
    assert m.check_vector_on_tangent(y, v), m.check_vector_on_tangent(y, v, explain=True)
    if dtype == torch.float32:
        assert not torch.allclose(lm.inner(x, u), torch.zeros(()), atol=1e-5, rtol=1e-5)
    off = u.clone()
    off[-1, 0] += 1e-3 * u[-1].norm()  # a time-like part: |<x,off>_L| = 1e-3 x0 |u|, 100x the tolerance
    ok, reason = m.check_vector_on_tangent(x, off, explain=True)
    assert not ok and "1 of 512 vectors fail" in reason

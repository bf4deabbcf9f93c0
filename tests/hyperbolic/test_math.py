"""Lorentz maths against independent references, for k in {0.5, 1, 2} in float32 and float64."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_grendel.hyperbolic import math as lm
from tests.helpers.hyperbolic import DTYPES, KS, assert_on_hyperboloid, random_points

G = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64))


def tangent_at(x: torch.Tensor, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype) * scale
    return lm.proju(x, u, _k(x))



def _k(x: torch.Tensor) -> float:
    return -lm.inner(x.double(), x.double())[..., :1].mean().item()


def poincare_dist(x: torch.Tensor, y: torch.Tensor, k: float) -> torch.Tensor:
    """Independent reference: map to the Poincare ball of radius sqrt(k) and use its formula."""
    r = math.sqrt(k)
    p = r * x[..., 1:] / (r + x[..., :1])
    q = r * y[..., 1:] / (r + y[..., :1])
    num = 2 * k * ((p - q) ** 2).sum(-1)
    den = (k - (p * p).sum(-1)) * (k - (q * q).sum(-1))
    return r * torch.acosh(1 + num / den)


@pytest.mark.parametrize("k", KS)
def test_distance_matches_poincare_and_logmap_norm(k):
    x = random_points(64, 5, k, torch.float64, seed=0)
    y = random_points(64, 5, k, torch.float64, seed=1)
    d = lm.dist(x, y, k)
    torch.testing.assert_close(d, poincare_dist(x, y, k), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lm.tangent_norm(lm.logmap(x, y, k)), d, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(lm.sqdist(x, y, k), 2 * k * (torch.cosh(d / math.sqrt(k)) - 1), rtol=1e-9,
                               atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
def test_distance_metric_axioms(k, dtype):
    x = random_points(24, 5, k, dtype, seed=2)
    d = lm.dist(x.unsqueeze(1), x.unsqueeze(0), k)
    atol = 2e-3 if dtype == torch.float32 else 1e-6
    torch.testing.assert_close(d, d.T)
    assert d.diagonal().abs().max() <= atol
    # triangle inequality over all triples of the sample
    assert (d.unsqueeze(2) <= d.unsqueeze(1) + d.T.unsqueeze(0) + atol).all()


@pytest.mark.parametrize("k", KS)
def test_sqrt_k_scaling(k):
    """Points of the k = 1 hyperboloid scaled by sqrt(k) lie on the k one, with distances * sqrt(k)."""
    x1 = random_points(16, 4, 1.0, torch.float64, seed=3)
    y1 = random_points(16, 4, 1.0, torch.float64, seed=4)
    r = math.sqrt(k)
    torch.testing.assert_close(lm.dist(r * x1, r * y1, k), r * lm.dist(x1, y1, 1.0))
    u1 = tangent_at(x1)
    torch.testing.assert_close(lm.expmap(r * x1, r * u1, k), r * lm.expmap(x1, u1, 1.0))
    torch.testing.assert_close(lm.logmap(r * x1, r * y1, k), r * lm.logmap(x1, y1, 1.0))
    torch.testing.assert_close(lm.centroid(r * x1, k), r * lm.centroid(x1, 1.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
def test_expmap_logmap_inverse(k, dtype):
    x = random_points(32, 6, k, dtype, seed=5)
    u = tangent_at(x, seed=6)
    y = lm.expmap(x, u, k)
    assert_on_hyperboloid(y, k)
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == torch.float32 else dict(rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(lm.logmap(x, y, k), u, **tol)
    torch.testing.assert_close(lm.dist(x, y, k), lm.tangent_norm(u), **tol)
    y2 = random_points(32, 6, k, dtype, seed=7)
    torch.testing.assert_close(lm.expmap(x, lm.logmap(x, y2, k), k), y2, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
def test_origin_maps_agree_with_general_maps(k, dtype):
    o = lm.origin((32, 6), k, dtype=dtype)
    u = tangent_at(o, seed=8)
    torch.testing.assert_close(lm.expmap0(u, k), lm.expmap(o, u, k))
    y = random_points(32, 6, k, dtype, seed=9)
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else None
    torch.testing.assert_close(lm.logmap0(y, k), lm.logmap(o, y, k), **(tol or {}))
    torch.testing.assert_close(lm.expmap0(lm.logmap0(y, k), k), y, **(tol or {}))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
def test_extreme_inputs_stay_on_manifold(k, dtype):
    far = random_points(16, 8, k, dtype, spread=1e3, seed=10)  # x0 ~ 3e3
    assert_on_hyperboloid(lm.projx(far * 1.5, k), k)
    huge = tangent_at(far, seed=11, scale=1e4)  # geodesic lengths far beyond cosh's float range
    assert_on_hyperboloid(lm.expmap(far, huge, k), k)
    assert_on_hyperboloid(lm.expmap0(torch.randn(16, 8, dtype=dtype) * 1e6, k), k)
    assert torch.isfinite(lm.logmap0(far, k)).all() and torch.isfinite(lm.dist(far, far.flip(0), k)).all()
    clipped = lm.projx(far, k, max_norm=1.5)
    assert_on_hyperboloid(clipped, k)
    assert clipped[:, 1:].norm(dim=-1).max() <= 1.5 + 1e-5


@pytest.mark.parametrize("k", KS)
def test_parallel_transport_is_an_isometry_onto_the_target_tangent_space(k):
    x = random_points(16, 5, k, torch.float64, seed=12)
    y = random_points(16, 5, k, torch.float64, seed=13)
    u, v = tangent_at(x, seed=14), tangent_at(x, seed=15)
    pu, pv = lm.transp(x, y, u, k), lm.transp(x, y, v, k)
    torch.testing.assert_close(lm.inner(y, pu), torch.zeros(16, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(lm.inner(pu, pv), lm.inner(u, v))
    # the geodesic's own velocity is transported to minus the reverse logmap
    torch.testing.assert_close(lm.transp(x, y, lm.logmap(x, y, k), k), -lm.logmap(y, x, k))


@pytest.mark.parametrize("k", KS)
def test_riemannian_gradient_gives_directional_derivative(k):
    x = random_points(8, 5, k, torch.float64, seed=16)
    target = random_points(8, 5, k, torch.float64, seed=17)
    xg = x.clone().requires_grad_(True)
    lm.dist(xg, target, k).pow(2).sum().backward()
    rgrad = lm.egrad2rgrad(x, xg.grad, k)
    u = tangent_at(x, seed=18)
    eps = 1e-6
    f = lambda p: lm.dist(p, target, k).pow(2)  # noqa: E731
    numeric = (f(lm.expmap(x, eps * u, k)) - f(lm.expmap(x, -eps * u, k))) / (2 * eps)
    torch.testing.assert_close(lm.inner(rgrad, u), numeric, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lm.inner(x, rgrad), torch.zeros(8, dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
def test_centroid(k, dtype):
    x = random_points(10, 5, k, dtype, seed=19)
    c = lm.centroid(x, k)
    assert_on_hyperboloid(c, k)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else None
    torch.testing.assert_close(lm.centroid(x[:1], k), x[0], **(tol or {}))
    w = torch.rand(3, 10, dtype=dtype)
    cw = lm.centroid(x, k, w)
    assert cw.shape == (3, 5)
    assert_on_hyperboloid(cw, k)
    if dtype == torch.float64:  # the centroid minimises the weighted sum of squared Lorentzian distances
        cost = lambda p: (w[0] * lm.sqdist(p.unsqueeze(0), x, k)).sum()  # noqa: E731
        for seed in range(5):
            nearby = lm.expmap(cw[0], tangent_at(cw[:1], seed=seed, scale=0.05)[0], k)
            assert cost(cw[0]) <= cost(nearby) + 1e-12


def test_arcosh_gradcheck_and_clamp():
    z = (1.0 + torch.rand(20, dtype=torch.float64) * 5 + 1e-3).requires_grad_(True)
    assert torch.autograd.gradcheck(lm.arcosh, (z,))
    torch.testing.assert_close(lm.arcosh(z), torch.acosh(z))
    at_one = torch.ones(3, dtype=torch.float64, requires_grad=True)
    lm.arcosh(at_one * 0.999999).sum().backward()  # below the domain: clamped, gradient finite
    assert torch.isfinite(at_one.grad).all()
    assert lm.arcosh(torch.ones(1)).item() == 0.0


@pytest.mark.parametrize("k", KS)
def test_bounded_time_point(k):
    z = torch.randn(50, 6, dtype=torch.float64) * torch.logspace(-3, 8, 50, dtype=torch.float64)[:, None]
    out = lm.bounded_time_point(z, k, 10.0, 1.1 * math.sqrt(k))
    assert_on_hyperboloid(out, k)
    assert (out[:, 0] >= 1.1 * math.sqrt(k) - 1e-9).all() and (out[:, 0] <= 1.1 * math.sqrt(k) + 10 + 1e-9).all()
    # the space direction of z is kept
    cos = torch.nn.functional.cosine_similarity(out[:, 1:], z[:, 1:], dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))
    zero_space = torch.zeros(2, 6, dtype=torch.float64)
    assert_on_hyperboloid(lm.bounded_time_point(zero_space, k, 10.0, 1.1 * math.sqrt(k)), k)


def test_boost_and_rotation_preserve_the_minkowski_metric():
    g = torch.Generator().manual_seed(20)
    v = torch.randn(6, 4, generator=g, dtype=torch.float64)
    v = 0.95 * v / v.norm(dim=-1, keepdim=True) * torch.rand(6, 1, generator=g, dtype=torch.float64)
    b = lm.boost_matrix(v)
    r = lm.rotation_matrix(torch.linalg.qr(torch.randn(6, 4, 4, generator=g, dtype=torch.float64))[0])
    for m in (b, r, b @ r):
        torch.testing.assert_close(m.transpose(-1, -2) @ G @ m, G.expand(6, 5, 5))
    for k in KS:
        x = random_points(6, 5, k, torch.float64, seed=21)
        y = random_points(6, 5, k, torch.float64, seed=22)
        bx, by = (b @ x.unsqueeze(-1)).squeeze(-1), (b @ y.unsqueeze(-1)).squeeze(-1)
        assert_on_hyperboloid(bx, k)
        torch.testing.assert_close(lm.dist(bx, by, k), lm.dist(x, y, k))  # an isometry
    o = lm.origin((6, 5), 1.0, dtype=torch.float64)
    gamma = 1 / torch.sqrt(1 - (v * v).sum(-1, keepdim=True))
    torch.testing.assert_close((b @ o.unsqueeze(-1)).squeeze(-1), torch.cat([gamma, -gamma * v], -1))

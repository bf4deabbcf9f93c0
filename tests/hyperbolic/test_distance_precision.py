"""Lorentz distance between nearby points against mpmath at 60 digits (the arcosh form loses them)."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import torch

from lightning_grendel.hyperbolic import math as lm

mpmath.mp.dps = 60


def pair(center: np.ndarray, direction: np.ndarray, delta: float, k: float, dtype=torch.float64):
    """Two points whose space parts are ``c`` and ``c + delta * unit(direction)`` (time from the space part)."""
    xs = center
    ys = center + delta * direction / np.linalg.norm(direction)
    pts = [np.concatenate([[np.sqrt(k + v @ v)], v]) for v in (xs, ys)]
    return (torch.tensor(np.stack(pts[:1]), dtype=dtype), torch.tensor(np.stack(pts[1:]), dtype=dtype))


def reference(x: torch.Tensor, y: torch.Tensor, k: float) -> tuple[mpmath.mpf, mpmath.mpf]:
    """Exact (distance, d_L^2) of the points the given space parts define, times solved in mpmath."""
    xs = [mpmath.mpf(float(v)) for v in x[0, 1:].double()]
    ys = [mpmath.mpf(float(v)) for v in y[0, 1:].double()]
    km = mpmath.mpf(k)
    x0 = mpmath.sqrt(km + sum(v * v for v in xs))
    y0 = mpmath.sqrt(km + sum(v * v for v in ys))
    neg_inner = x0 * y0 - sum(a * b for a, b in zip(xs, ys, strict=True))
    return mpmath.sqrt(km) * mpmath.acosh(neg_inner / km), 2 * neg_inner - 2 * km


def rel_err(value: torch.Tensor, ref: mpmath.mpf) -> float:
    return float(abs((mpmath.mpf(float(value.double().item())) - ref) / ref))


CASES = {  # name: (center, direction)
    "origin": (np.zeros(4), np.array([1.0, -2.0, 0.5, 3.0])),
    "near_origin": (np.array([0.3, -0.1, 0.2, 0.05]), np.array([-1.0, 0.4, 2.0, 0.3])),
    "x0_1e3_radial": (np.array([600.0, -500.0, 400.0, 400.0]), np.array([600.0, -500.0, 400.0, 400.0])),
    "x0_1e3_random": (np.array([600.0, -500.0, 400.0, 400.0]), np.array([0.3, 1.0, -0.7, 0.2])),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("k", [1.0, 2.5])
@pytest.mark.parametrize("delta", [1e-6, 1e-4])
@pytest.mark.parametrize("case", list(CASES))
def test_nearby_distance_matches_mpmath(case, delta, k):
    x, y = pair(*CASES[case], delta, k)
    ref_d, ref_d2 = reference(x, y, k)
    assert rel_err(lm.dist(x, y, k), ref_d) < 1e-8
    assert rel_err(lm.sqdist(x, y, k), ref_d2) < 1e-8
    assert rel_err(lm.dist(y, x, k), ref_d) < 1e-8  # symmetric


@pytest.mark.timeout(30)
def test_the_reference_sees_the_arcosh_form_fail():
    """The naive ``sqrt(k) arcosh(-<x,y>_L / k)`` is far off at x0 ~ 1e3, so the test above can fail."""
    x, y = pair(*CASES["x0_1e3_radial"], 1e-6, 1.0)
    ref_d, _ = reference(x, y, 1.0)
    naive = lm.arcosh(-lm.inner(x, y))
    assert rel_err(naive, ref_d) > 1e-2
    x, y = pair(*CASES["near_origin"], 1e-6, 1.0)
    assert rel_err(lm.arcosh(-lm.inner(x, y)), reference(x, y, 1.0)[0]) > 1e-6


@pytest.mark.timeout(30)
@pytest.mark.parametrize("delta", [0.5, 3.0, 20.0])
def test_far_points_keep_full_precision(delta):
    x, y = pair(np.array([1.0, 2.0, -0.5, 0.0]), np.array([-1.0, 0.2, 0.3, 1.0]), delta, 1.0)
    ref_d, ref_d2 = reference(x, y, 1.0)
    assert rel_err(lm.dist(x, y, 1.0), ref_d) < 1e-12
    assert rel_err(lm.sqdist(x, y, 1.0), ref_d2) < 1e-12


@pytest.mark.timeout(30)
def test_float32_nearby_distance():
    x, y = pair(*CASES["near_origin"], 1e-3, 1.0, dtype=torch.float32)
    ref_d, _ = reference(x, y, 1.0)
    assert rel_err(lm.dist(x, y, 1.0), ref_d) < 1e-4
    assert rel_err(lm.arcosh(-lm.inner(x, y)), ref_d) > 1e-3  # what the arcosh form gives


@pytest.mark.timeout(30)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_are_finite_at_equal_points(dtype):
    x = torch.tensor([[np.sqrt(1 + 0.14), 0.3, -0.2, 0.1]], dtype=dtype, requires_grad=True)
    y = x.detach().clone().requires_grad_(True)
    (lm.dist(x, y, 1.0).sum() + lm.sqdist(x, y, 1.0).sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    assert lm.dist(x, y, 1.0).item() == 0.0
    # and the gradient of the distance to a nearby point is the unit one d(dist)/dy ~ direction
    x, y = pair(*CASES["near_origin"], 1e-5, 1.0)
    y.requires_grad_(True)
    lm.dist(x, y, 1.0).sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().max() < 10

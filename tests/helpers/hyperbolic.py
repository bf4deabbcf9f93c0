"""Shared helpers for the hyperbolic tests: random points and the hyperboloid invariant."""

from __future__ import annotations

import torch

from lightning_grendel.hyperbolic import math as lm

KS = (0.5, 1.0, 2.0)
DTYPES = (torch.float32, torch.float64)


def random_points(n: int, dim: int, k: float, dtype: torch.dtype, spread: float = 1.0, seed: int = 0):
    """Points on the hyperboloid built from Gaussian space parts (time solved for, in float64)."""
    g = torch.Generator().manual_seed(seed)
    space = torch.randn(n, dim - 1, generator=g, dtype=torch.float64) * spread
    time = torch.sqrt(k + (space * space).sum(-1, keepdim=True))
    return torch.cat([time, space], dim=-1).to(dtype)


def assert_on_hyperboloid(x: torch.Tensor, k: float, heads: int = 1) -> None:
    """|<x,x>_L + k| <= tol * max(1, x0^2) per point (tol 1e-4 in float32, 1e-9 in float64), x0 > 0."""
    tol = 1e-4 if x.dtype == torch.float32 else 1e-9
    x = x.unflatten(-1, (heads, -1)).double() if heads > 1 else x.double()
    assert torch.isfinite(x).all()
    err = (lm.inner(x, x) + k).abs()
    bound = tol * torch.clamp(x[..., 0] ** 2, min=1.0)
    assert (x[..., 0] > 0).all()
    assert (err <= bound).all(), f"max violation {(err / bound).max().item():.3g} x tolerance"

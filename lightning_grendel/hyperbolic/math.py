"""Lorentz-model maths as plain functions, every sqrt(k) kept.

Points satisfy ``<x, x>_L = -k`` (curvature ``-1/k``) with the time coordinate first and ``x0 > 0``;
the origin is ``(sqrt(k), 0, ..., 0)``. ``k`` may be a float or a (learnable) tensor that broadcasts
against the last-dimension-reduced shapes. The reference HyboNet code drops the sqrt(k) factors and
is only right for ``k = 1``; keeping them here is what makes ``k != 1`` and learnable ``k`` correct.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Largest geodesic length (in units of sqrt(k)) fed to cosh/sinh: cosh(32)^2 ~ 1e27 stays finite in
# float32, so the hyperboloid constraint can still be evaluated on the result.
MAX_THETA = 32.0


def _eps(x: Tensor) -> float:
    return 1e-7 if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-15


def _as_tensor(k: float | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(k, dtype=like.dtype, device=like.device)


class _Arcosh(torch.autograd.Function):
    """arcosh with the argument clamped at 1 and a gradient kept finite there by an eps floor."""

    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:  # type: ignore[override]
        z = z.clamp_min(1.0)
        ctx.save_for_backward(z)
        return torch.log(z + torch.sqrt(z * z - 1.0))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (z,) = ctx.saved_tensors
        return grad / torch.sqrt((z * z - 1.0).clamp_min(_eps(z)))


def arcosh(z: Tensor) -> Tensor:
    """Stable ``arcosh``: plain ``torch.acosh`` has an infinite gradient at 1 (identical points)."""
    return _Arcosh.apply(z)


def inner(u: Tensor, v: Tensor, keepdim: bool = False) -> Tensor:
    """Minkowski inner product ``-u0 v0 + sum_i ui vi`` over the last dimension."""
    prod = u * v
    out = prod[..., 1:].sum(-1, keepdim=True) - prod[..., :1]
    return out if keepdim else out.squeeze(-1)


def on_hyperboloid(x: Tensor, k: float | Tensor, atol: float, rtol: float) -> Tensor:
    """Per point: ``|<x, x>_L + k| <= atol + rtol * x0^2`` and ``x0 > 0``.

    The tolerance grows with ``x0^2`` because that is the size of the terms that cancel in ``<x, x>_L``:
    rounding alone leaves about ``eps * x0^2`` (a float32 point with ``x0 = 1e3`` is off by ~0.1 however
    carefully it was made). At the origin (``x0^2 = k``) it is geoopt's ``allclose(<x, x>_L, -k)``.
    """
    x0 = x[..., 0]
    return ((inner(x, x) + k).abs() <= atol + rtol * x0 * x0) & (x0 > 0)


def on_tangent(x: Tensor, u: Tensor, atol: float, rtol: float) -> Tensor:
    """Per vector: ``|<x, u>_L| <= atol + rtol * x0 * |u|`` (``|u|`` Euclidean), rounding's scale as above."""
    return inner(x, u).abs() <= atol + rtol * x[..., 0].abs() * torch.linalg.vector_norm(u, dim=-1)


def cinner(x: Tensor, y: Tensor) -> Tensor:
    """All-pairs Minkowski inner products ``<x_i, y_j>_L`` as one matmul (``(..., n, m)``)."""
    return x[..., 1:] @ y[..., 1:].transpose(-1, -2) - x[..., :1] @ y[..., :1].transpose(-1, -2)


def tangent_norm(u: Tensor, keepdim: bool = False) -> Tensor:
    """Norm ``sqrt(<u, u>_L)`` of a tangent vector (tangent spaces are space-like), eps-clamped."""
    return torch.sqrt(inner(u, u, keepdim=keepdim).clamp_min(_eps(u)))


def origin(shape: tuple[int, ...], k: float | Tensor, dtype=None, device=None) -> Tensor:
    """The origin ``(sqrt(k), 0, ..., 0)`` with the given shape (last dimension n+1)."""
    out = torch.zeros(shape, dtype=dtype, device=device)
    out[..., 0] = torch.sqrt(_as_tensor(k, out))
    return out


def projx(x: Tensor, k: float | Tensor, max_norm: float | None = None) -> Tensor:
    """Nearest point on the hyperboloid keeping the space part: ``time = sqrt(k + |x_s|^2)``.

    ``max_norm`` optionally clips the space norm first (HyboNet's KG entity constraint).
    """
    space = x[..., 1:]
    if max_norm is not None:
        norm = space.norm(dim=-1, keepdim=True).clamp_min(_eps(x))
        space = space * (max_norm / norm).clamp_max(1.0)
    time = torch.sqrt(_as_tensor(k, x) + (space * space).sum(-1, keepdim=True))
    return torch.cat([time, space], dim=-1)


def proju(x: Tensor, u: Tensor, k: float | Tensor) -> Tensor:
    """Project ``u`` onto the tangent space at ``x``: ``u + <x, u>_L x / k``."""
    return u + inner(x, u, keepdim=True) * x / _as_tensor(k, x)


def egrad2rgrad(x: Tensor, grad: Tensor, k: float | Tensor) -> Tensor:
    """Riemannian gradient: raise the index with the metric (flip g0), then project to T_x."""
    grad = torch.cat([-grad[..., :1], grad[..., 1:]], dim=-1)
    return proju(x, grad, k)


def _sqdist_close(x: Tensor, y: Tensor, k: Tensor) -> Tensor:
    """``d_L^2 = <x - y, x - y>_L`` from differences only, with no cancellation for nearby points.

    With ``p = x_s - y_s``, ``s = x_s + y_s``, ``T = x0 + y0`` the hyperboloid gives
    ``x0 - y0 = p.s / T`` and ``T^2 - |s|^2 = 4k + d_L^2``; splitting ``p`` into ``a = p.s/|s|`` along
    ``s`` and ``p_perp`` across it leaves ``d_L^2 = (T^2 |p_perp|^2 + 4k a^2) / (T^2 - a^2)``, a ratio of
    sums of non-negative terms. The time coordinates enter only through ``T``, so the points are those
    their space parts define.
    """
    p = x[..., 1:] - y[..., 1:]
    s = x[..., 1:] + y[..., 1:]
    t2 = (x[..., 0] + y[..., 0]) ** 2
    ss = (s * s).sum(-1).clamp_min(torch.finfo(x.dtype).tiny)
    ps = (p * s).sum(-1)
    a2 = ps * ps / ss
    p_perp = p - (ps / ss).unsqueeze(-1) * s
    num = t2 * (p_perp * p_perp).sum(-1) + 4.0 * k * a2
    return num / (t2 - a2).clamp_min(_eps(x))


def _sqdist_parts(x: Tensor, y: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(close, d_L^2 from differences, -<x, y>_L)``; ``close`` where ``d_L^2 < k`` (distance below
    about ``sqrt(k)``), where the inner-product form ``-2k - 2<x, y>_L`` would cancel."""
    neg_inner = -inner(x, y)
    close = (2.0 * neg_inner - 2.0 * k) < k
    return close, _sqdist_close(x, y, k), neg_inner


def _keep(t: Tensor, keepdim: bool) -> Tensor:
    return t.unsqueeze(-1) if keepdim else t


def dist(x: Tensor, y: Tensor, k: float | Tensor, keepdim: bool = False) -> Tensor:
    """Geodesic distance: ``2 sqrt(k) asinh(d_L / (2 sqrt(k)))`` with the difference-based ``d_L`` for
    nearby points (``arcosh`` of ``1 + d_L^2/2k`` would keep only ``eps / d^2`` relative digits), else
    ``sqrt(k) arcosh(-<x, y>_L / k)``. Finite gradient (zero) at ``x == y``."""
    k = _as_tensor(k, x)
    sqrt_k = torch.sqrt(k)
    close, d2, neg_inner = _sqdist_parts(x, y, k)
    positive = d2 > torch.finfo(x.dtype).tiny  # sqrt'(0) is infinite: zero distance, zero gradient there
    d_l = torch.where(positive, torch.sqrt(torch.where(positive, d2, torch.ones_like(d2))), torch.zeros_like(d2))
    near = 2.0 * sqrt_k * torch.asinh(d_l / (2.0 * sqrt_k))
    far = sqrt_k * arcosh(neg_inner / k)
    return _keep(torch.where(close, near, far), keepdim)


def sqdist(x: Tensor, y: Tensor, k: float | Tensor, keepdim: bool = False) -> Tensor:
    """Squared Lorentzian distance ``-2k - 2<x, y>_L`` (>= 0; no arcosh, cheap and smooth), from
    differences for nearby points (see :func:`dist`)."""
    k = _as_tensor(k, x)
    close, d2, neg_inner = _sqdist_parts(x, y, k)
    return _keep(torch.where(close, d2, 2.0 * neg_inner - 2.0 * k).clamp_min(0.0), keepdim)


def expmap(x: Tensor, u: Tensor, k: float | Tensor) -> Tensor:
    """``cosh(|u|/sqrt(k)) x + sqrt(k) sinh(|u|/sqrt(k)) u/|u|`` (re-projected for float safety)."""
    k = _as_tensor(k, x)
    sqrt_k = torch.sqrt(k)
    norm = tangent_norm(u, keepdim=True)
    theta = (norm / sqrt_k).clamp_max(MAX_THETA)
    out = torch.cosh(theta) * x + sqrt_k * torch.sinh(theta) * u / norm
    return projx(out, k)


def expmap0(u: Tensor, k: float | Tensor) -> Tensor:
    """expmap at the origin; only the space part of ``u`` is used (its time part is 0 in T_o)."""
    k = _as_tensor(k, u)
    sqrt_k = torch.sqrt(k)
    space = u[..., 1:]
    norm = space.norm(dim=-1, keepdim=True).clamp_min(_eps(u))
    theta = (norm / sqrt_k).clamp_max(MAX_THETA)
    out_space = sqrt_k * torch.sinh(theta) * space / norm
    return projx(torch.cat([torch.zeros_like(u[..., :1]), out_space], dim=-1), k)


def logmap(x: Tensor, y: Tensor, k: float | Tensor) -> Tensor:
    """Inverse of :func:`expmap`: ``dist(x, y) * v / |v|_L`` with ``v = y + <x, y>_L x / k``."""
    k = _as_tensor(k, x)
    v = y + inner(x, y, keepdim=True) * x / k
    return dist(x, y, k, keepdim=True) * v / tangent_norm(v, keepdim=True)


def logmap0(y: Tensor, k: float | Tensor) -> Tensor:
    """logmap at the origin: ``(0, sqrt(k) arcosh(y0/sqrt(k)) y_s/|y_s|)``."""
    k = _as_tensor(k, y)
    sqrt_k = torch.sqrt(k)
    space = y[..., 1:]
    norm = space.norm(dim=-1, keepdim=True).clamp_min(_eps(y))
    d = sqrt_k * arcosh(y[..., :1] / sqrt_k)
    return torch.cat([torch.zeros_like(y[..., :1]), d * space / norm], dim=-1)


def transp(x: Tensor, y: Tensor, v: Tensor, k: float | Tensor) -> Tensor:
    """Parallel transport of ``v`` from T_x to T_y along the geodesic:
    ``v + <y, v>_L / (k - <x, y>_L) (x + y)``."""
    k = _as_tensor(k, x)
    denom = (k - inner(x, y, keepdim=True)).clamp_min(_eps(x))
    return v + inner(y, v, keepdim=True) / denom * (x + y)


def centroid(x: Tensor, k: float | Tensor, weights: Tensor | None = None) -> Tensor:
    """Lorentz centroid: ``a = w @ x`` (or the mean), then ``sqrt(k) a / sqrt(|<a, a>_L|)``.

    ``x`` is ``(..., n, d)``; ``weights`` is ``(..., m, n)`` (non-negative) giving ``(..., m, d)``.
    The centroid minimises the weighted sum of squared Lorentzian distances.
    """
    a = x.mean(dim=-2) if weights is None else weights @ x
    # The result is invariant to scaling a; dividing by a0 (>= |a_s| for time-like a) keeps <a, a>_L
    # away from the eps clamp when the weights are tiny (e.g. softmax followed by dropout).
    a0 = a[..., :1].detach()
    a = a / torch.where(a0 > 0, a0, torch.ones_like(a0))
    denom = torch.sqrt(inner(a, a, keepdim=True).abs().clamp_min(_eps(x)))
    return torch.sqrt(_as_tensor(k, x)) * a / denom


def bounded_time_point(z: Tensor, k: float | Tensor, time_scale: Tensor | float, time_offset: Tensor | float) -> Tensor:
    """Map a Euclidean vector ``z`` (time logit first) onto the hyperboloid (HyboNet's LorentzLinear).

    ``t = sigmoid(z0) * time_scale + time_offset`` (``time_offset > sqrt(k)``) fixes the time; the space
    part keeps the direction of ``z_s`` with norm ``sqrt(t^2 - k)``. The direction is taken after
    dividing by the largest entry, so huge inputs cannot overflow, and the time is recomputed from the
    space part, so a zero ``z_s`` gives the origin instead of an off-manifold point.
    """
    k = _as_tensor(k, z)
    time = torch.sigmoid(z[..., :1]) * time_scale + time_offset
    space = z[..., 1:]
    # unit = space / |space| is scale invariant, so dividing by the (detached) largest entry changes
    # neither its value nor its gradient; afterwards |space|^2 is 0 or in [1, n], so clamping it at 1
    # only touches the zero vector, whose gradient then stays finite (no sqrt'(0)).
    amax = space.detach().abs().amax(-1, keepdim=True)
    space = space / torch.where(amax > 0, amax, torch.ones_like(amax))
    unit = space / torch.sqrt((space * space).sum(-1, keepdim=True).clamp_min(1.0))
    space = unit * torch.sqrt((time * time - k).clamp_min(0.0))
    return projx(torch.cat([time, space], dim=-1), k)


def boost_matrix(v: Tensor) -> Tensor:
    """Lorentz boost with velocity ``v`` (``|v| < 1``): ``[[g, -g v^T], [-g v, I + g^2/(1+g) v v^T]]``.

    It preserves the Minkowski metric (``B^T G B = G``) and maps the hyperboloid to itself.
    """
    n = v.shape[-1]
    g = 1.0 / torch.sqrt(1.0 - (v * v).sum(-1, keepdim=True))
    top = torch.cat([g, -g * v], dim=-1).unsqueeze(-2)
    eye = torch.eye(n, dtype=v.dtype, device=v.device)
    lower = eye + (g * g / (1.0 + g)).unsqueeze(-1) * v.unsqueeze(-1) * v.unsqueeze(-2)
    bottom = torch.cat([(-g * v).unsqueeze(-1), lower], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def rotation_matrix(r: Tensor) -> Tensor:
    """Lorentz rotation ``[[1, 0], [0, R]]`` from an orthogonal ``R`` (time left untouched)."""
    n = r.shape[-1]
    out = torch.zeros(*r.shape[:-2], n + 1, n + 1, dtype=r.dtype, device=r.device)
    out[..., 0, 0] = 1.0
    out[..., 1:, 1:] = r
    return out

"""``LorentzManifold``: a thin geoopt manifold whose maths is :mod:`lightning_grendel.hyperbolic.math`.

It subclasses geoopt's abstract ``Manifold`` (not ``geoopt.Lorentz``) so that no method silently
falls back to an implementation that drops the sqrt(k) factors; ``geoopt.ManifoldParameter`` and
``geoopt.optim.RiemannianAdam`` / ``RiemannianSGD`` use it as they use any geoopt manifold.
"""

from __future__ import annotations

import geoopt
import torch
from torch import Tensor, nn

from lightning_grendel.hyperbolic import math as lm


class LorentzManifold(geoopt.manifolds.base.Manifold):
    """Hyperboloid ``<x, x>_L = -k``. ``learnable=True`` trains ``k`` (read through a clamp at 1e-4, so > 0).

    ``max_norm`` (optional) clips the space norm of points in :meth:`projx`, which RiemannianAdam's
    ``stabilize`` calls periodically: HyboNet's KG model bounds its entity embeddings this way.

    ``retraction="projection"`` makes the optimiser step ``projx(x + u)`` and carry its momentum by
    tangent projection instead of expmap + parallel transport: both are first-order accurate, the
    projection needs about a third of the elementwise passes (it matters for large embedding tables
    on CPU) and applies ``max_norm`` on every step.
    """

    name = "Lorentz"
    ndim = 1
    reversible = False

    def __init__(self, k: float = 1.0, learnable: bool = False, max_norm: float | None = None,
                 retraction: str = "expmap") -> None:
        super().__init__()
        if k <= 0:
            raise ValueError(f"k must be positive (curvature -1/k), got {k}")
        if retraction not in ("expmap", "projection"):
            raise ValueError(f"retraction must be 'expmap' or 'projection', got {retraction!r}")
        self.retraction = retraction
        self.raw_k = nn.Parameter(torch.tensor(float(k)), requires_grad=learnable)
        self.max_norm = max_norm

    @property
    def k(self) -> Tensor:
        return self.raw_k.clamp_min(1e-4)

    def _check_point_on_manifold(self, x: Tensor, *, atol: float = 1e-5, rtol: float = 1e-5, dim: int = -1):
        """Each point within ``atol + rtol * x0^2`` of ``<x, x>_L = -k``, ``x0 > 0`` (:func:`lm.on_hyperboloid`)."""
        k = self.k.detach().to(x)
        ok = lm.on_hyperboloid(x, k, atol, rtol)
        if bool(ok.all()):
            return True, None
        return False, (f"'x' is not on the hyperboloid <x,x>_L = -{k.item():.4g} with x0 > 0: {int((~ok).sum())} of "
                       f"{ok.numel()} points fail |<x,x>_L + k| <= atol + rtol * x0^2 (atol={atol:g}, rtol={rtol:g})")

    def _check_vector_on_tangent(self, x: Tensor, u: Tensor, *, atol: float = 1e-5, rtol: float = 1e-5,
                                 dim: int = -1):
        """Each ``u`` Minkowski-orthogonal to its ``x`` within ``atol + rtol * x0 * |u|`` (:func:`lm.on_tangent`)."""
        ok = lm.on_tangent(x, u, atol, rtol)
        if bool(ok.all()):
            return True, None
        return False, (f"'u' is not Minkowski-orthogonal to 'x': {int((~ok).sum())} of {ok.numel()} vectors fail "
                       f"|<x,u>_L| <= atol + rtol * x0 * |u| (atol={atol:g}, rtol={rtol:g})")

    def inner(self, x: Tensor, u: Tensor, v: Tensor | None = None, *, keepdim: bool = False,
              dim: int = -1) -> Tensor:
        return lm.inner(u, u if v is None else v, keepdim=keepdim)

    def norm(self, x: Tensor, u: Tensor, *, keepdim: bool = False, dim: int = -1) -> Tensor:
        return lm.tangent_norm(u, keepdim=keepdim)

    def projx(self, x: Tensor, *, dim: int = -1) -> Tensor:
        return lm.projx(x, self.k.to(x), self.max_norm)

    def proju(self, x: Tensor, u: Tensor, *, dim: int = -1) -> Tensor:
        return lm.proju(x, u, self.k.to(x))

    def egrad2rgrad(self, x: Tensor, u: Tensor, *, dim: int = -1) -> Tensor:
        return lm.egrad2rgrad(x, u, self.k.to(x))

    def expmap(self, x: Tensor, u: Tensor, *, dim: int = -1) -> Tensor:
        return lm.expmap(x, u, self.k.to(x))

    def retr(self, x: Tensor, u: Tensor, *, dim: int = -1) -> Tensor:
        if self.retraction == "projection":
            return lm.projx(x + u, self.k.to(x), self.max_norm)
        return lm.expmap(x, u, self.k.to(x))

    def retr_transp(self, x: Tensor, u: Tensor, v: Tensor, *, dim: int = -1) -> tuple[Tensor, Tensor]:
        y = self.retr(x, u)
        if self.retraction == "projection":
            return y, lm.proju(y, v, self.k.to(x))
        return y, lm.transp(x, y, v, self.k.to(x))

    def logmap(self, x: Tensor, y: Tensor, *, dim: int = -1) -> Tensor:
        return lm.logmap(x, y, self.k.to(x))

    def expmap0(self, u: Tensor) -> Tensor:
        return lm.expmap0(u, self.k.to(u))

    def logmap0(self, y: Tensor) -> Tensor:
        return lm.logmap0(y, self.k.to(y))

    def transp(self, x: Tensor, y: Tensor, v: Tensor, *, dim: int = -1) -> Tensor:
        return lm.transp(x, y, v, self.k.to(x))

    def dist(self, x: Tensor, y: Tensor, *, keepdim: bool = False, dim: int = -1) -> Tensor:
        return lm.dist(x, y, self.k.to(x), keepdim=keepdim)

    def sqdist(self, x: Tensor, y: Tensor, *, keepdim: bool = False) -> Tensor:
        return lm.sqdist(x, y, self.k.to(x), keepdim=keepdim)

    def centroid(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        return lm.centroid(x, self.k.to(x), weights)

    def origin(self, *size: int, dtype=None, device=None, seed: int | None = None) -> Tensor:
        return lm.origin(tuple(size), self.k.detach(), dtype=dtype, device=device)

    def random_normal(self, *size: int, std: float = 1.0, dtype=None, device=None) -> Tensor:
        """Points ``expmap0`` of Gaussian tangent vectors at the origin (time part zero)."""
        u = torch.randn(*size, dtype=dtype, device=device) * std
        u[..., 0] = 0.0
        return lm.expmap0(u, self.k.detach().to(u))

    random = random_normal

    def extra_repr(self) -> str:
        return (f"k={self.k.item():.4g}, learnable={self.raw_k.requires_grad}, max_norm={self.max_norm}, "
                f"retraction={self.retraction}")

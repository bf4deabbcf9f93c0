"""``LorentzRiemannianAdam``: geoopt's RiemannianAdam, with hyperboloid tables updated in one fused pass.

A knowledge-graph model keeps one point per entity (WN18RR: 40,943 x 32) and Adam moves every row on
every step (momentum), so the optimiser step is a function of the whole table. geoopt's
``RiemannianAdam`` runs it as about 35 whole-table tensor operations (Riemannian gradient, moments,
expmap, parallel transport, re-projection), each allocating a table-sized temporary; on a CPU that was
most of a training step. Here a :class:`~lightning_grendel.hyperbolic.manifold.LorentzManifold`
parameter on the CPU is updated by ``csrc/lorentz_adam.cpp`` in one pass over its rows, with the same
maths, and keeps the second moment once per point instead of in each of its ``d`` columns. Plain
tensors take Adam's update with in-place operations (geoopt treats them as points of its Euclidean
manifold); every other parameter (other manifolds, other devices, ``amsgrad``) takes
:meth:`LorentzRiemannianAdam._reference_step`, the same algorithm written with the manifold's methods,
which is also the fallback when the extension cannot be built. Both are tested step by step against
``geoopt.optim.RiemannianAdam`` (``tests/hyperbolic/test_optim.py``); the state (``step``,
``exp_avg``, ``exp_avg_sq``) has geoopt's keys, and each optimiser continues from the other's.
"""

from __future__ import annotations

import geoopt
import torch
from torch import Tensor

from lightning_grendel.hyperbolic import cpp
from lightning_grendel.hyperbolic.manifold import LorentzManifold

_FUSED_DTYPES = (torch.float32, torch.float64)


class LorentzRiemannianAdam(geoopt.optim.RiemannianAdam):
    """``geoopt.optim.RiemannianAdam`` (same arguments, same results) with a fused step for Lorentz tables.

    Args:
        params: parameters or parameter groups, as for any torch optimiser.
        lr: learning rate.
        betas: Adam's moment decay rates.
        eps: added to the second moment's square root.
        weight_decay: L2 penalty added to the (Euclidean) gradient.
        amsgrad: keep the maximum second moment (always takes the reference path).
        stabilize: re-project manifold parameters (and their momentum) every this many steps; None: never.
        kernel: use the C++ kernel where it applies and can be built (``False``: the reference path only).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, stabilize: int | None = None,
                 kernel: bool = True) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         stabilize=stabilize)
        self.kernel = kernel

    def _fusable(self, point: Tensor, grad: Tensor, amsgrad: bool) -> bool:
        manifold = getattr(point, "manifold", None)
        return (self.kernel and not amsgrad and isinstance(manifold, LorentzManifold) and point.device.type == "cpu"
                and point.dtype in _FUSED_DTYPES and grad.dtype == point.dtype and not grad.is_sparse
                and point.is_contiguous() and cpp.load(cpp.LORENTZ_ADAM) is not None)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            for point in live:
                if point.grad.is_sparse:
                    raise RuntimeError("LorentzRiemannianAdam does not support sparse gradients")
                state = self.state[point]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(point)
                    # LorentzManifold's component_inner is one value per point: kept once, not in every
                    # column as geoopt does (it continues from this state all the same: the value broadcasts)
                    lorentz = isinstance(getattr(point, "manifold", None), LorentzManifold)
                    state["exp_avg_sq"] = torch.zeros_like(point[..., :1] if lorentz else point)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(point)
                state["step"] = int(state["step"]) + 1  # load_state_dict turns geoopt's int into a float32 tensor
            # geoopt re-projects the whole group after a step in which any parameter's count hits a multiple
            every = group["stabilize"]
            stabilize = every is not None and any(self.state[p]["step"] % every == 0 for p in live)
            for point in live:
                if self._fusable(point, point.grad, group["amsgrad"]):
                    self._fused_step(point, group, stabilize)
                elif getattr(point, "manifold", None) is None and not group["amsgrad"]:
                    self._euclidean_step(point, group)
                else:
                    self._reference_step(point, group)
                    if stabilize:
                        self._stabilize_point(point)
            if stabilize:  # manifold parameters with state but no gradient this step
                for point in group["params"]:
                    if point.grad is None and self.state.get(point):
                        self._stabilize_point(point)
        return loss

    def _fused_step(self, point: Tensor, group: dict, stabilize: bool) -> None:
        state = self.state[point]
        manifold: LorentzManifold = point.manifold
        beta1, beta2 = group["betas"]
        t = state["step"]
        max_norm = -1.0 if manifold.max_norm is None else float(manifold.max_norm)
        cpp.load(cpp.LORENTZ_ADAM).lorentz_adam_step(
            point.data, point.grad.contiguous(), state["exp_avg"], state["exp_avg_sq"], float(group["lr"]),
            float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]), 1.0 - beta1 ** t,
            1.0 - beta2 ** t, float(manifold.k.item()), max_norm, manifold.retraction == "projection", stabilize)

    def _euclidean_step(self, point: Tensor, group: dict) -> None:
        """The reference step on a plain tensor (geoopt's Euclidean manifold: Adam), with in-place ops."""
        state = self.state[point]
        beta1, beta2 = group["betas"]
        t = state["step"]
        grad = point.grad if group["weight_decay"] == 0 else point.grad + group["weight_decay"] * point
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = exp_avg_sq.div(1 - beta2 ** t).sqrt_().add_(group["eps"])
        point.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1 ** t))

    def _reference_step(self, point: Tensor, group: dict) -> None:
        """One Riemannian Adam step through the manifold's methods (Euclidean for plain tensors)."""
        state = self.state[point]
        manifold = getattr(point, "manifold", None) or self._default_manifold
        beta1, beta2 = group["betas"]
        t = state["step"]
        grad = point.grad + group["weight_decay"] * point
        rgrad = manifold.egrad2rgrad(point, grad)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(rgrad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).add_(manifold.component_inner(point, rgrad), alpha=1 - beta2)
        second = exp_avg_sq
        if group["amsgrad"]:
            second = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
        direction = exp_avg / (1 - beta1 ** t) / ((second / (1 - beta2 ** t)).sqrt() + group["eps"])
        new_point, new_exp_avg = manifold.retr_transp(point, -group["lr"] * direction, exp_avg)
        point.copy_(new_point)
        exp_avg.copy_(new_exp_avg)

    def _stabilize_point(self, point: Tensor) -> None:
        manifold = getattr(point, "manifold", None)
        if manifold is None:
            return
        point.copy_(manifold.projx(point))
        exp_avg = self.state[point]["exp_avg"]
        exp_avg.copy_(manifold.proju(point, exp_avg))

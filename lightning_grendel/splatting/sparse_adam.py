"""Adam that steps only the Gaussians a view saw, each on its own step clock.

A Gaussian outside every view of a step has a zero gradient; dense Adam still decays its moments and
moves it by the momentum left over. DashGaussian's and gsplat's sparse Adam skip those rows instead.
Skipping makes a row's moments see only the steps it took part in, so its bias correction must count
those steps too: the state keeps ``row_step`` [N] per parameter beside the moments, and row ``i`` after
its ``t``-th visible step is exactly what dense Adam gives a parameter stepped ``t`` times with the
same gradients. When every row is visible at every step, this is dense Adam.

:mod:`~lightning_grendel.splatting.param_surgery` edits ``row_step`` with the moments: densified rows
start at 0, pruned ones leave, rows whose moments are zeroed restart their clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class VisibleAdam(torch.optim.Optimizer):
    """Adam over row-major parameters [N, ...] that steps only the rows named by :meth:`set_visible`.

    Call ``set_visible(mask)`` (bool [N]) before each ``step()``; without it (or with None) every row steps.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        if lr < 0 or eps < 0 or not (0 < betas[0] < 1 and 0 < betas[1] < 1):
            raise ValueError(f"VisibleAdam: invalid lr={lr}, betas={betas} or eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.visible: Tensor | None = None

    def set_visible(self, mask: Tensor | None) -> None:
        """Rows [N] the next :meth:`step` updates (None: all)."""
        self.visible = mask

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is not None:
                    self._step_rows(param, group["lr"], beta1, beta2, group["eps"])
        self.visible = None
        return loss

    def _step_rows(self, param: Tensor, lr: float, beta1: float, beta2: float, eps: float) -> None:
        state = self.state[param]
        if not state:
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
            state["row_step"] = torch.zeros(param.shape[0], dtype=torch.float32, device=param.device)
        rows = None if self.visible is None else torch.nonzero(self.visible.to(param.device)).flatten()
        if rows is not None and rows.numel() == param.shape[0]:
            rows = None  # every row: the same arithmetic without gathering
        grad, exp_avg, exp_avg_sq, row_step = param.grad, state["exp_avg"], state["exp_avg_sq"], state["row_step"]
        if rows is not None:
            grad, exp_avg, exp_avg_sq, row_step = (t.index_select(0, rows) for t in (grad, exp_avg, exp_avg_sq,
                                                                                    row_step))
        row_step = row_step + 1
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # Per row: b1 = 1 - beta1^t and b2 = 1 - beta2^t (as -expm1(t log beta): exact in float32 where
        # 1 - 0.999^t would cancel). Adam's update lr/b1 · m / (sqrt(v / b2) + eps) is
        # (lr·sqrt(b2)/b1) · m / (sqrt(v) + eps·sqrt(b2)): per-row factors on [N], few passes over [N, ...].
        shape = (-1,) + (1,) * (param.dim() - 1)
        bias1 = -torch.expm1(row_step * math.log(beta1))
        bias2_sqrt = (-torch.expm1(row_step * math.log(beta2))).sqrt()
        denom = exp_avg_sq.sqrt().add_((eps * bias2_sqrt).to(param.dtype).view(shape))
        update = (exp_avg * (lr * bias2_sqrt / bias1).to(param.dtype).view(shape)).div_(denom)
        if rows is None:
            param.sub_(update)
            state["row_step"] = row_step
            return
        param.index_add_(0, rows, update, alpha=-1)
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
        state["row_step"].index_copy_(0, rows, row_step)

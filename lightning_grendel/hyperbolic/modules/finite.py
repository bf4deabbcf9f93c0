"""Stop a Lorentz training run at the first non-finite loss or parameter, naming it and the step.

A NaN in a hyperboloid embedding does not announce itself: metrics keep being computed (ranks of NaN
scores are arbitrary) and the run exits 0 with a useless model. The loss is checked before backward and
every parameter right after the optimiser step, inside the module's ``optimizer_step`` hook, so the
error comes before any callback (a checkpoint) sees the step. The checks are local to the process (the
hyperbolic recipes run on one); under a multi-process strategy the other ranks then fail at their next
collective within the process-group timeout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class NonFiniteTrainingError(FloatingPointError):
    """A loss or parameter of a Lorentz model became NaN or infinite."""


def _all_finite(tensor: Tensor) -> bool:
    """One reduction: a NaN or infinity anywhere makes the sum non-finite. A finite sum can still overflow
    (values near the dtype's maximum), so a non-finite sum is only a reason to count (:func:`_bad_rows`)."""
    return bool(torch.isfinite(tensor.detach().sum()))


def _bad_rows(tensor: Tensor) -> int:
    if tensor.numel() == 0:  # e.g. another pipeline stage's parameter, released on this rank
        return 0
    finite = torch.isfinite(tensor.detach())
    return int((~finite.reshape(finite.shape[0], -1).all(dim=1)).sum()) if finite.dim() > 0 else int(not finite)


class StopOnNonFinite:
    """LightningModule mixin (put it first among the bases)."""

    _HINT = "lower the learning rate, or clip gradients (--trainer.gradient_clip_val)"

    def on_before_backward(self, loss: Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteTrainingError(
                f"{type(self).__name__}: the training loss is {loss.detach().float().sum().item()} at optimiser "
                f"step {self.global_step + 1}; {self._HINT}"
            )
        super().on_before_backward(loss)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        bad = {name: rows for name, p in self.named_parameters() if not _all_finite(p) and (rows := _bad_rows(p))}
        if bad:
            listed = ", ".join(f"{name}: {rows} rows" for name, rows in bad.items())
            raise NonFiniteTrainingError(
                f"{type(self).__name__}: non-finite parameters after optimiser step {self.global_step + 1} ({listed}); "
                f"{self._HINT}"
            )

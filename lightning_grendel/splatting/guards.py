"""Finite-value guards for Gaussian training: stop (or skip and repair) before a NaN reaches a checkpoint.

NaN Gaussians are culled when rendered, so a diverged model can keep a finite loss while every row of
its PLY is NaN (a NaN pose or a far too large learning rate does that in one step). The guard therefore
looks at the parameters and gradients themselves. Its verdict is collective: every rank adds its counts
into one small all-reduce, so all ranks stop (or skip) together instead of one rank raising while the
others wait in the next collective until the timeout.

``stop`` raises :class:`NonFiniteError` from the training step: Lightning ends the run with a non-zero
exit and no checkpoint is written after the failure. ``skip`` drops a step whose loss or gradients are
non-finite, and resets the offending rows (non-finite gradients, or values made non-finite by a step) to
their values before the last step taken, with zeroed Adam moments; it keeps one copy of the Gaussians
for that, and gives up after ``MAX_CONSECUTIVE_SKIPS`` skipped steps in a row (a broken dataset, not a
rare spike).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_grendel.splatting.param_surgery import ROW_STATE_KEYS, select_rows

log = logging.getLogger(__name__)

NonFiniteMode = Literal["stop", "skip"]
MAX_CONSECUTIVE_SKIPS = 10
ROW_CHUNK = 1 << 16  # rows bad_rows checks at a time
_HINT = ("lower the learning rates (lr_means, lr_scales, ...) or check the dataset's cameras; "
         "on_nonfinite='skip' skips such steps instead")


class NonFiniteError(FloatingPointError):
    """A loss, parameter or gradient became NaN or infinite during training."""


def bad_rows(tensor: Tensor) -> Tensor:
    """Bool [N]: rows of ``tensor`` [N, ...] with at least one non-finite entry.

    One sum first: a NaN or infinity anywhere makes it non-finite, so a finite sum proves every row finite
    at the cost of one read (the row scan was the largest stage of a step above ~0.6M Gaussians,
    benchmarks/cost_curves.py). A finite tensor can still overflow the sum; then the rows are scanned,
    ``ROW_CHUNK`` at a time: ``isfinite`` makes an ``abs`` copy and three boolean masks of its input, which
    on the whole SH gradient of a million Gaussians were the step's peak memory (315 bytes a Gaussian,
    benchmarks/gaussian_memory.py).
    """
    tensor = tensor.detach()
    if tensor.numel() == 0 or torch.isfinite(tensor.sum()):
        return torch.zeros(tensor.shape[0], dtype=torch.bool, device=tensor.device)
    rows = []
    for chunk in tensor.split(ROW_CHUNK):
        finite = torch.isfinite(chunk)
        rows.append(~(finite.flatten(1).all(dim=1) if finite.dim() > 1 else finite))
    return torch.cat(rows)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_sum(counts: Tensor) -> Tensor:
    """``counts`` summed over every rank (a collective when a process group is up; all ranks must call)."""
    if _world() > 1:
        counts = counts.clone()
        dist.all_reduce(counts)
    return counts


def _describe(names: list[str], counts: Tensor) -> str:
    return ", ".join(f"{name}: {int(c)} rows" for name, c in zip(names, counts.tolist(), strict=True) if c)


class FiniteGuard:
    """Checks one Gaussian ``ParameterDict`` around each optimiser step and after densification."""

    def __init__(self, mode: NonFiniteMode = "stop", owner: str = "GaussianSplattingModule") -> None:
        if mode not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {mode!r}")
        self.mode = mode
        self.owner = owner
        self.skipped_in_a_row = 0
        self._before: dict[str, Tensor] | None = None

    def _fail(self, what: str, step: int, images: int) -> NonFiniteError:
        ranks = f" (summed over {_world()} ranks)" if _world() > 1 else ""
        return NonFiniteError(f"{self.owner}: {what} at optimiser step {step} ({images} images seen){ranks}; {_HINT}")

    def _reset_rows(self, params: Mapping[str, Tensor], optimizer: torch.optim.Optimizer, rows: Tensor) -> None:
        """Rows back to the copy taken before the last step (when it still matches), Adam moments zeroed."""
        before = self._before
        same = before is not None and all(before[k].shape == p.shape for k, p in params.items())
        state = getattr(optimizer, "state", {})
        with torch.no_grad():
            for key, param in params.items():
                if same:
                    param[rows] = before[key][rows]
                for moment in ROW_STATE_KEYS:
                    if moment in state.get(param, {}):
                        state[param][moment][rows] = 0

    def before_step(self, loss: Tensor, params: Mapping[str, Tensor], optimizer: torch.optim.Optimizer,
                    step: int, images: int) -> bool:
        """After backward: True to go on with the step; False when ``skip`` drops it (on every rank)."""
        names = [f"{key}.grad" for key in params]
        grad_rows = [bad_rows(p.grad) if p.grad is not None else p.new_zeros(p.shape[0], dtype=torch.bool)
                     for p in params.values()]
        local = [int(not torch.isfinite(loss.detach()).all())] + [int(rows.sum()) for rows in grad_rows]
        counts = global_sum(torch.tensor(local, dtype=torch.int64, device=loss.device))  # NCCL: on the GPU
        if not counts.any():
            self.skipped_in_a_row = 0
            if self.mode == "skip":
                self._before = {key: p.detach().clone() for key, p in params.items()}
            return True
        parts = []
        if counts[0]:
            value = loss.detach().float().sum().item()
            parts.append(f"the loss is {value} after {images} images" if not torch.isfinite(loss.detach()).all()
                         else f"the loss is non-finite on {int(counts[0])} other rank(s)")
        if counts[1:].any():
            parts.append("non-finite gradients (" + _describe(names, counts[1:]) + ")")
        what = "; ".join(parts)
        self.skipped_in_a_row += 1
        if self.mode == "stop" or self.skipped_in_a_row > MAX_CONSECUTIVE_SKIPS:
            giving_up = f"{MAX_CONSECUTIVE_SKIPS} steps skipped in a row, giving up: " if self.mode == "skip" else ""
            raise self._fail(giving_up + what, step, images)
        rows = torch.stack(grad_rows).any(dim=0)
        self._reset_rows(params, optimizer, rows)
        log.warning("%s: skipped optimiser step %d: %s; reset %d local rows", self.owner, step, what, int(rows.sum()))
        return False

    def _non_finite_rows(self, params: Mapping[str, Tensor], when: str, step: int,
                         images: int) -> tuple[Tensor, str] | None:
        """``None`` when every rank's rows are finite; else raise (``stop``) or return (local rows, summary)."""
        masks = [bad_rows(p) for p in params.values()]
        counts = global_sum(torch.stack([m.sum() for m in masks]).to(torch.int64))
        if not counts.any():
            return None
        described = _describe(list(params), counts)
        if self.mode == "stop":
            raise self._fail(f"non-finite parameters {when} ({described})", step, images)
        return torch.stack(masks).any(dim=0), described

    def after_step(self, params: Mapping[str, Tensor], optimizer: torch.optim.Optimizer, step: int,
                   images: int) -> int:
        """After the optimiser step: stop, or restore the rows that became non-finite; returns how many."""
        found = self._non_finite_rows(params, "after the step", step, images)
        if found is None:
            return 0
        rows, described = found
        self._reset_rows(params, optimizer, rows)
        log.warning("%s: optimiser step %d made rows non-finite (%s); restored %d local rows to their values "
                    "before the step and reset their Adam moments", self.owner, step, described, int(rows.sum()))
        return int(rows.sum())

    def after_densify(self, params: Mapping[str, Tensor], optimizer: torch.optim.Optimizer | None, step: int,
                      images: int) -> int:
        """After densification: stop, or drop the non-finite rows (there is no earlier copy to restore)."""
        found = self._non_finite_rows(params, "after densification", step, images)
        if found is None:
            return 0
        rows, described = found
        select_rows(params, optimizer, ~rows)
        log.warning("%s: densification at step %d made rows non-finite (%s); removed %d local rows",
                    self.owner, step, described, int(rows.sum()))
        return int(rows.sum())

"""Trainer flags a Gaussian splatting run cannot honour, refused with one error before anything runs.

A flag that would be silently wrong is refused instead: the error names each such flag and what to use.
Which flags work, with the test of each, is in docs/grendel_conformance.md.

- ``precision``: only ``32-true`` and ``64-true``. Mixed precision would run the projection's matrix
  products (the 2-D covariances whose inverses are the conics) in half precision under autocast while
  the rasterizer, its 1/255 opacity cut-off and Adam stay in float32; ``16-true``/``bf16-true`` would
  store positions, log-scales and Adam moments in 11/8 significant bits, where Adam's small steps
  round away. gsplat's kernels compute in float32 only, so ``64-true`` needs the cpp or torch rasterizer.
- ``gradient_clip_val``: Lightning clips only under automatic optimisation; the module's own
  ``gradient_clip_val`` argument clips (by the global norm over every shard under GrendelStrategy).
- ``accumulate_grad_batches``: the module steps once per batch (manual optimisation, and densification
  counts images per step); more views per step (``batch_size``) is the way to average more images.
- ``deterministic`` with gsplat: its CUDA backward adds gradients with atomics, in a different order on
  every run, so a bitwise-reproducible run cannot be promised.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from lightning_grendel.splatting.rasterize import resolve_backend

ClipAlgorithm = Literal["norm", "value"]
SUPPORTED_PRECISION = ("32-true", "64-true")
_PRECISION_WHY = {
    "16-mixed": "autocast would compute the projection (2-D covariances, their inverse conics) in float16 while the "
                "rasterizer and Adam stay in float32: sub-pixel splats get wrong footprints",
    "bf16-mixed": "autocast would compute the projection (2-D covariances, their inverse conics) in bfloat16 while "
                  "the rasterizer and Adam stay in float32: sub-pixel splats get wrong footprints",
    "16-true": "the Gaussians and their Adam moments would be float16 (11 significant bits): small Adam steps of "
               "positions and log-scales round away",
    "bf16-true": "the Gaussians and their Adam moments would be bfloat16 (8 significant bits): small Adam steps of "
                 "positions and log-scales round away",
}


def check_clip_arguments(value: float | None, algorithm: str, owner: str) -> None:
    """The module's own clipping arguments: a positive value (or None) and ``norm`` or ``value``."""
    if algorithm not in ("norm", "value"):
        raise ValueError(f"{owner}: gradient_clip_algorithm must be 'norm' or 'value', got {algorithm!r}")
    if value is not None and not value > 0:
        raise ValueError(f"{owner}: gradient_clip_val must be > 0 (or None for no clipping), got {value!r}")


def _effective_backend(trainer: Any, backend: str) -> str:
    try:
        return resolve_backend(backend, trainer.strategy.root_device)
    except (AssertionError, AttributeError, IndexError, TypeError):  # devices not known yet
        return backend


def unsupported_flags(trainer: Any, backend: str) -> list[str]:
    """One sentence per Trainer flag of ``trainer`` this module cannot honour (empty when all are fine)."""
    problems = []
    precision = str(trainer.precision)
    chosen = _effective_backend(trainer, backend)
    if precision not in SUPPORTED_PRECISION:
        why = _PRECISION_WHY.get(precision, "not a precision the rasterizer supports")
        problems.append(f"Trainer(precision={precision!r}) is not supported: {why}; use precision='32-true' "
                        "(the default) or '64-true'")
    elif precision == "64-true" and chosen == "gsplat":
        problems.append("Trainer(precision='64-true') with the gsplat rasterizer: gsplat computes in float32 only; "
                        "use backend='cpp' (CPU) or 'torch'")
    fitting = getattr(getattr(trainer, "state", None), "fn", None) == "fit"
    clip = trainer.gradient_clip_val
    if fitting and clip is not None and clip > 0:
        algorithm = trainer.gradient_clip_algorithm or "norm"
        algorithm = getattr(algorithm, "value", algorithm)
        problems.append(f"Trainer(gradient_clip_val={clip}) does not apply to this module's manual optimisation; "
                        f"pass it to the module: gradient_clip_val={clip}, gradient_clip_algorithm={algorithm!r} "
                        "(--model.gradient_clip_val), which clips by the norm over every shard under GrendelStrategy")
    accumulate = trainer.accumulate_grad_batches
    if fitting and accumulate != 1:
        problems.append(f"Trainer(accumulate_grad_batches={accumulate}) is not supported (one optimiser step per "
                        "batch: manual optimisation, densification counts images per step); train on more views per "
                        "step instead: GaussianSplattingDataModule(batch_size=...) (--data.batch_size), whose Adam "
                        "hyperparameters follow batch_scaling")
    if torch.are_deterministic_algorithms_enabled() and chosen == "gsplat":  # what Trainer(deterministic) sets
        problems.append("Trainer(deterministic=True) cannot hold with the gsplat rasterizer: its CUDA backward adds "
                        "gradients with atomics, in a different order on every run; use backend='torch' or drop the "
                        "flag")
    return problems


def refuse_unsupported_flags(trainer: Any, backend: str, owner: str) -> None:
    """Raise one ValueError naming every flag :func:`unsupported_flags` finds."""
    problems = unsupported_flags(trainer, backend)
    if problems:
        raise ValueError(f"{owner}: " + "; ".join(problems))

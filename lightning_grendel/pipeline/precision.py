"""Lightning precision plugins in a pipeline: which ones run as in the plain run, and clipping over all stages.

What each precision means here (Lightning converts the module before the stages are cut, and the
training loop converts each batch, so the stages and their inputs already have the right dtypes):

- ``32-true``: nothing to do.
- ``64-true``, ``bf16-true``, ``16-true``: parameters in that dtype; the plugin's forward context sets the
  default dtype around every stage forward (the runtime's ``forward_context``), as around
  ``training_step`` in a plain run.
- ``bf16-mixed``: autocast around every stage forward and the loss, not around backward (a region that
  turns autocast off would otherwise have its backward cast down). Stage outputs cross the boundaries in
  the dtype autocast gives them, as in the plain run.
- ``16-mixed`` with a ``GradScaler`` (CUDA): refused. The scaler's inf/NaN check and the steps it skips
  would be per stage; a sound version needs one found-inf over all stages. On CPU Lightning itself runs
  ``16-mixed`` as ``bf16-mixed`` (with its warning), which is supported.
- Any other plugin (transformer-engine, bitsandbytes, DeepSpeed, FSDP, XLA, subclasses): refused, untested.
"""

from __future__ import annotations

from collections.abc import Callable

from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from torch import Tensor
from torch.optim import Optimizer

from lightning_grendel.pipeline.clipping import clip_grad_norm_

_SUPPORTED = (Precision, DoublePrecision, HalfPrecision, MixedPrecision)


def precision_refusal(plugin: Precision, fitting: bool) -> str | None:
    """Why ``plugin`` cannot run in a pipeline as in the plain run, or ``None`` when it can."""
    if type(plugin) not in _SUPPORTED:
        return (f"precision plugin {type(plugin).__name__} is not supported; use precision '32-true', '64-true', "
                "'bf16-true', '16-true' or 'bf16-mixed'")
    if fitting and isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
        return (f"precision='{plugin.precision}' trains with a GradScaler, whose inf/NaN check and skipped steps "
                "would be per stage; use precision='bf16-mixed' (no scaler) or '32-true'")
    return None


def clip_over_pipeline(plugin: Precision, counted: Callable[[list[Tensor]], list[Tensor]]) -> None:
    """Make ``plugin`` clip by the norm over all stages (``Trainer(gradient_clip_val=...)``, norm algorithm).

    Lightning clips through the plugin (``LightningModule.clip_gradients`` calls it), which would take
    the norm of this rank's gradients only. ``counted(params)`` picks the parameters this rank counts
    (``ownership.counted_parameters``). Clipping by value stays the plugin's own: it is elementwise.
    """
    def clip_grad_by_norm(optimizer: Optimizer, clip_val: float) -> None:
        params = list(plugin.main_params(optimizer))
        clip_grad_norm_(params, counted(params), clip_val)

    plugin.clip_grad_by_norm = clip_grad_by_norm  # type: ignore[method-assign]

"""Trainer settings a pipeline cannot run as the plain run would: refused before anything runs or is written.

Every Trainer feature either gives what the unpipelined run gives (tested, see
docs/pipeline_conformance.md) or is named here with what to do instead. The strategy calls
:func:`check_trainer` first thing in ``setup_environment``, before loggers create their files.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import StochasticWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from lightning_grendel.pipeline.precision import precision_refusal


def refusals(trainer: Any, module: Any) -> list[str]:
    """What in ``trainer`` and ``module`` the pipeline refuses, one line each naming the flag or hook."""
    fitting = trainer.state.fn == TrainerFn.FITTING
    problems = []
    precision = precision_refusal(trainer.precision_plugin, fitting)
    if precision is not None:
        problems.append(precision)
    if not fitting:
        return problems
    if not module.automatic_optimization:
        problems.append("manual optimisation (`automatic_optimization = False`, which Lightning also needs for "
                        "several optimisers) runs forward and backward in your training_step, but the pipeline "
                        "must run them itself; use automatic optimisation with one optimiser (param groups for "
                        "different settings)")
    if is_overridden("configure_gradient_clipping", module):
        problems.append("`configure_gradient_clipping` is overridden: clipping there with torch would use this "
                        "rank's stage only; remove it and set Trainer(gradient_clip_val=..., "
                        "gradient_clip_algorithm=...), which the strategy clips over all stages")
    if any(isinstance(callback, StochasticWeightAveraging) for callback in trainer.callbacks):
        problems.append("StochasticWeightAveraging averages the whole module on every rank, but a pipeline rank "
                        "only has its own stage's current weights (its average and checkpointed state of the other "
                        "stages would be stale); remove the callback")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        problems.append("BatchNorm layers (and Trainer(sync_batchnorm=True)) would normalise by micro-batch and rank "
                        "statistics instead of the batch's; use LayerNorm or GroupNorm")
    return problems


def check_trainer(trainer: Any, module: Any) -> None:
    """Raise one ``ValueError`` listing every refused setting, or return when the run is supported."""
    problems = refusals(trainer, module)
    if problems:
        raise ValueError("PipelineStrategy cannot run this as the unpipelined run would:\n- " + "\n- ".join(problems))

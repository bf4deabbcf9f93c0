"""Pipeline parallelism over stage meshes of any shape: stages, schedules, the runtime and ``PipelineStrategy``.

Everything but :class:`PipelineStrategy` and its Lightning glue (``flags.py``, ``precision.py``,
``module_steps.py``, ``whole_model.py``) is free of Lightning; the strategy is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_grendel.pipeline.runtime import PipelineRuntime, PipelineStepError
from lightning_grendel.pipeline.schedules import SCHEDULES, Schedule, clock_table, render
from lightning_grendel.pipeline.stages import Pipeline, PipelineStage

if TYPE_CHECKING:
    from lightning_grendel.pipeline.strategy import PipelineStrategy

__all__ = ["SCHEDULES", "Pipeline", "PipelineRuntime", "PipelineStage", "PipelineStepError", "PipelineStrategy",
           "Schedule", "clock_table", "render"]


def __getattr__(name: str) -> Any:
    if name == "PipelineStrategy":
        from lightning_grendel.pipeline.strategy import PipelineStrategy

        return PipelineStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Pipeline parallelism with cross-mesh resharding: meshes, specs, planner, executors, schedules, strategy."""

from lightning_grendel.strategies.pipeline.executors import GroupCache, simulate_plan, start_plan
from lightning_grendel.strategies.pipeline.mesh import Mesh, ShardingSpec
from lightning_grendel.strategies.pipeline.plan import EXECUTORS, ReshardPlan, make_plan
from lightning_grendel.strategies.pipeline.planner import Tile, UnitTask, tiles, unit_tasks
from lightning_grendel.strategies.pipeline.reshard import reshard
from lightning_grendel.strategies.pipeline.schedules import SCHEDULES
from lightning_grendel.strategies.pipeline.senders import SENDER_MODES, select_senders
from lightning_grendel.strategies.pipeline.shm import TRANSPORTS, SharedMemoryArenas, arena_layout
from lightning_grendel.strategies.pipeline.stages import Pipeline, PipelineStage
from lightning_grendel.strategies.pipeline.strategy import PipelineStrategy

__all__ = [
    "EXECUTORS",
    "SCHEDULES",
    "SENDER_MODES",
    "TRANSPORTS",
    "GroupCache",
    "Mesh",
    "Pipeline",
    "PipelineStage",
    "PipelineStrategy",
    "ReshardPlan",
    "ShardingSpec",
    "SharedMemoryArenas",
    "Tile",
    "UnitTask",
    "arena_layout",
    "make_plan",
    "reshard",
    "select_senders",
    "simulate_plan",
    "start_plan",
    "tiles",
    "unit_tasks",
]

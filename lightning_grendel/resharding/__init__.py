"""Cross-mesh resharding: deliver a tensor sharded one way on one mesh, sharded another way on another.

A library with no Lightning in it: meshes and sharding specs, the unit-task planner, sender selection,
plans for three executors, their gloo/NCCL and shared-memory execution, and a cost model.
"""

from lightning_grendel.resharding.costmodel import Topology, plan_makespan, traffic
from lightning_grendel.resharding.executors import GroupCache, simulate_plan, start_plan
from lightning_grendel.resharding.mesh import Mesh, ShardingSpec
from lightning_grendel.resharding.plan import EXECUTORS, Executor, ReshardPlan, make_plan
from lightning_grendel.resharding.reshard import reshard
from lightning_grendel.resharding.senders import SENDER_MODES, SenderMode, select_senders
from lightning_grendel.resharding.shm import TRANSPORTS, Transport
from lightning_grendel.resharding.tasks import Tile, UnitTask, tiles, unit_tasks

__all__ = [
    "EXECUTORS",
    "SENDER_MODES",
    "TRANSPORTS",
    "Executor",
    "GroupCache",
    "Mesh",
    "ReshardPlan",
    "SenderMode",
    "ShardingSpec",
    "Tile",
    "Topology",
    "Transport",
    "UnitTask",
    "make_plan",
    "plan_makespan",
    "reshard",
    "select_senders",
    "simulate_plan",
    "start_plan",
    "tiles",
    "traffic",
    "unit_tasks",
]

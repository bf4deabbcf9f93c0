"""Lightning strategies of this package, and their registration under short names.

There is no entry-point discovery for strategies in Lightning, so ``import lightning_grendel`` calls
:func:`register_strategies`, which is idempotent.
"""

from typing import Any

from lightning.pytorch.strategies import StrategyRegistry

from lightning_grendel.strategies.grendel import GrendelStrategy
from lightning_grendel.strategies.pipeline import PipelineStrategy

# name: (class, description, init parameters)
_REGISTERED: dict[str, tuple[type, str, dict[str, Any]]] = {
    "grendel": (GrendelStrategy, "Grendel distributed 3D Gaussian Splatting", {"start_method": "popen"}),
    "grendel_spawn": (GrendelStrategy, "Grendel distributed 3DGS in spawned processes", {"start_method": "spawn"}),
    "pipeline": (PipelineStrategy, "Pipeline parallelism with cross-mesh resharding", {}),
}


def register_strategies() -> None:
    """Register every strategy of the package with Lightning, once."""
    for name, (strategy_class, description, init_params) in _REGISTERED.items():
        if name not in StrategyRegistry:
            StrategyRegistry.register(name, strategy_class, description=description, **init_params)


__all__ = ["GrendelStrategy", "PipelineStrategy", "register_strategies"]

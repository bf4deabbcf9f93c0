"""Register this package's strategies with Lightning by name, without importing Lightning eagerly.

Lightning has no entry-point discovery for strategies, so ``import lightning_grendel`` arranges the
registration: at once if ``lightning.pytorch.strategies`` is already imported, otherwise the moment it
is (a one-shot import hook). Each name maps to a factory that imports its strategy class only when
``Trainer(strategy=name)`` builds one, so the libraries (``resharding``, ``hyperbolic.math``,
``splatting.rasterize``) stay importable without Lightning.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

_STRATEGIES_MODULE = "lightning.pytorch.strategies"

# name: (module, class, description, init parameters)
STRATEGIES: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "grendel": ("lightning_grendel.splatting.grendel.strategy", "GrendelStrategy",
                "Grendel distributed 3D Gaussian Splatting", {"start_method": "popen"}),
    "grendel_spawn": ("lightning_grendel.splatting.grendel.strategy", "GrendelStrategy",
                      "Grendel distributed 3DGS in spawned processes", {"start_method": "spawn"}),
    "pipeline": ("lightning_grendel.pipeline.strategy", "PipelineStrategy",
                 "Pipeline parallelism with cross-mesh resharding", {}),
}


def _factory(module: str, name: str) -> Callable[..., Any]:
    def build(**init_params: Any) -> Any:
        return getattr(importlib.import_module(module), name)(**init_params)

    build.__qualname__ = build.__name__ = name
    return build


def register_strategies(registry: Any = None) -> None:
    """Register every strategy of the package with Lightning's ``StrategyRegistry`` (idempotent)."""
    if registry is None:
        registry = importlib.import_module(_STRATEGIES_MODULE).StrategyRegistry
    for name, (module, class_name, description, init_params) in STRATEGIES.items():
        if name not in registry:
            registry.register(name, _factory(module, class_name), description=description, **init_params)


class _RegisterWhenLightningLoads(importlib.abc.MetaPathFinder):
    """Finds ``lightning.pytorch.strategies`` like the normal path finder, and registers after it has run."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname != _STRATEGIES_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        sys.meta_path.remove(self)
        run_module = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            register_strategies(module.StrategyRegistry)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def register_when_lightning_loads() -> None:
    """Register now if Lightning's strategies are imported, else as soon as they are."""
    if _STRATEGIES_MODULE in sys.modules:
        register_strategies(sys.modules[_STRATEGIES_MODULE].StrategyRegistry)
    elif not any(isinstance(finder, _RegisterWhenLightningLoads) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWhenLightningLoads())

"""Lightning strategies of this package, and their registration under short names.

There is no entry-point discovery for strategies in Lightning, so ``import lightning_grendel`` calls
:func:`register_strategies`, which is idempotent.
"""

from lightning.pytorch.strategies import StrategyRegistry

_REGISTERED: dict[str, tuple[str, str]] = {
    # name: (module path, class name); filled in as strategies land.
}


def register_strategies() -> None:
    """Register every strategy of the package with Lightning, once."""
    import importlib

    for name, (module_path, class_name) in _REGISTERED.items():
        if name in StrategyRegistry:
            continue
        strategy_class = getattr(importlib.import_module(module_path), class_name)
        StrategyRegistry.register(name, strategy_class, description=strategy_class.__doc__ or name)

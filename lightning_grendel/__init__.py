"""lightning-grendel: Lightning strategies and modules for Grendel 3DGS, cross-mesh pipelines and Lorentz networks.

Importing the package registers its strategies with Lightning's ``StrategyRegistry`` so that
``Trainer(strategy="grendel")`` and ``Trainer(strategy="pipeline")`` work in any project.
"""

from lightning_grendel.strategies import register_strategies

__version__ = "0.1.0"

register_strategies()

__all__ = ["__version__", "register_strategies"]

"""lightning-grendel: Lightning strategies and modules for Grendel 3DGS, cross-mesh pipelines and Lorentz networks.

``import lightning_grendel`` registers ``grendel``, ``grendel_spawn`` and ``pipeline`` with Lightning's
``StrategyRegistry`` (lazily: Lightning is not imported by this), so ``Trainer(strategy="grendel")``
works in any project. The classes recipes name are reachable by short paths such as
``lightning_grendel.GaussianSplattingModule``; each is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_grendel._registry import register_strategies, register_when_lightning_loads

__version__ = "0.1.0"

_SHORT_PATHS = {
    "GaussianSplattingModule": "lightning_grendel.splatting.module",
    "GaussianSplattingDataModule": "lightning_grendel.splatting.data.datamodule",
    "RunSummary": "lightning_grendel.splatting.callbacks",
    "RunLogger": "lightning_grendel.loggers",
    "LastCheckpoint": "lightning_grendel.checkpointing",
    "LiveViewer": "lightning_grendel.splatting.viewer.live",
    "GrendelStrategy": "lightning_grendel.splatting.grendel.strategy",
    "PipelineStrategy": "lightning_grendel.pipeline.strategy",
    "LorentzGCNModule": "lightning_grendel.hyperbolic.modules.gcn",
    "LorentzGCNLinkModule": "lightning_grendel.hyperbolic.modules.gcn",
    "LorentzKGModule": "lightning_grendel.hyperbolic.modules.kg",
    "LorentzTransformerModule": "lightning_grendel.hyperbolic.modules.transformer",
    "KnowledgeGraphDataModule": "lightning_grendel.hyperbolic.data.knowledge_graph",
    "PlanetoidDataModule": "lightning_grendel.hyperbolic.data.planetoid",
    "SequenceTaskDataModule": "lightning_grendel.hyperbolic.data.sequences",
}

register_when_lightning_loads()

__all__ = ["__version__", "register_strategies", *_SHORT_PATHS]


def __getattr__(name: str) -> Any:
    if name in _SHORT_PATHS:
        return getattr(importlib.import_module(_SHORT_PATHS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

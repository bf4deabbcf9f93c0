"""Grendel: distributed 3DGS with sharded Gaussians, pixel partitions and a sparse all-to-all.

The partition, exchange, balancer and checkpoint modules are plain torch.distributed code;
:class:`GrendelStrategy` (the Lightning part) is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_grendel.splatting.grendel.strategy import GrendelStrategy

__all__ = ["GrendelStrategy"]


def __getattr__(name: str) -> Any:
    if name == "GrendelStrategy":
        from lightning_grendel.splatting.grendel.strategy import GrendelStrategy

        return GrendelStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

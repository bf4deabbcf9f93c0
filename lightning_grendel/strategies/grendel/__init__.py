"""GrendelStrategy: distributed 3DGS with sharded Gaussians, pixel partitions and a sparse all-to-all."""

from lightning_grendel.strategies.grendel.strategy import GrendelStrategy

__all__ = ["GrendelStrategy"]

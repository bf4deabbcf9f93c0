"""The contracts between a Gaussian LightningModule, its renderer and a sharding strategy.

A module renders through a :class:`Renderer`, which a strategy may replace with its own (Grendel's
renders one pixel partition per rank). A strategy that shards Gaussians offers the module
:class:`GaussianShardingStrategy`; on a plain Lightning strategy the module keeps every Gaussian.
A user's own Gaussian module works with :class:`~lightning_grendel.GrendelStrategy` by following these.
Its loss should be scene-wide on every rank (each rank's share added up with
:func:`~lightning_grendel.splatting.shard_reduce.sum_over_ranks`), and it may define
``check_trainer(trainer)``, which GrendelStrategy calls before launching any rank, to refuse Trainer
flags it cannot honour.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_grendel.splatting.cameras import Cameras
    from lightning_grendel.splatting.render import RenderResult


@runtime_checkable
class Renderer(Protocol):
    """Renders a module's Gaussians for a batch of cameras.

    Call order in a training step: ``renderer(params, cameras, ...)`` returns which rows of which views
    were rendered here (the loss covers exactly those rows; with ``absgrad`` its ``absgrad`` leaf
    collects the per-pixel absolute gradients of the 2-D means, summed on the Gaussian's owner);
    ``last_stats`` then holds the step's numbers worth logging (bytes exchanged, load imbalance; empty
    on one process). ``render_full`` gives
    whole images on every rank, for validation, tests and exports (a collective when sharded).
    """

    backend: str
    last_stats: dict[str, float]

    def __call__(
        self, params: dict[str, Tensor], cameras: Cameras, sh_degree: int, background: Tensor, halo: int = 0,
        absgrad: bool = False,
    ) -> RenderResult: ...

    def render_full(self, params: dict[str, Tensor], cameras: Cameras, sh_degree: int, background: Tensor) -> Tensor:
        ...


@runtime_checkable
class GaussianShardingStrategy(Protocol):
    """What a strategy that shards Gaussians over ranks offers the module.

    Call order: ``shard_indices`` once in ``configure_model`` (the rows of the initial points this rank
    keeps; for an ``init_ply`` file, in ``configure_optimizers``, after any checkpoint is restored);
    ``after_density_change`` after every densification (the strategy may move rows between ranks,
    editing the optimizer state with them); ``gather_gaussians`` when exporting (every Gaussian
    on rank 0, ``None`` elsewhere; a collective).
    """

    def shard_indices(self, count: int) -> slice | Tensor: ...

    def after_density_change(self, params: nn.ParameterDict, optimizer: torch.optim.Optimizer) -> None: ...

    def gather_gaussians(self, params: nn.ParameterDict) -> dict[str, Tensor] | None: ...

"""Each rank keeps only its stages' weights; the whole model comes back only when asked for.

A model is usually built whole on every rank. Once it is known which stages (chunks) a rank runs,
:meth:`StageResidency.release` drops the storage of every other stage's parameters: each becomes an
empty tensor of its dtype and device. The ``Parameter`` objects stay, so optimisers, tied references
and traced graph modules keep pointing at them; they get no gradient here, so no optimiser state is
made for them, and a use of one fails on its shape instead of computing with a stale value.
Parameters of no stage are kept everywhere. Two collectives bring values back, each tensor from its
owner (``ownership.py``): :meth:`state_dict` builds the full state dict on one rank (a checkpoint),
:meth:`materialize` gives every rank every parameter and buffer again.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_grendel.pipeline.ownership import owners
from lightning_grendel.resharding.mesh import Mesh


class StageResidency:
    """Which of ``root``'s tensors ``rank`` keeps, given the stage modules and each stage's mesh.

    Every rank must construct it with the same arguments and call the collectives in one order.
    """

    def __init__(self, root: nn.Module, stages: Sequence[nn.Module], meshes: Sequence[Mesh], rank: int) -> None:
        self.root, self.rank = root, rank
        tensors = itertools.chain(root.parameters(), root.buffers(), *(m.parameters() for m in stages),
                                  *(m.buffers() for m in stages))
        self._tensors = list({id(t): t for t in tensors}.values())  # one order on every rank
        self._owners = dict(zip(map(id, self._tensors), owners(self._tensors, stages, meshes), strict=True))
        held = {id(p) for module, mesh in zip(stages, meshes, strict=True) if rank in mesh.ranks
                for p in module.parameters()}
        staged = {id(p) for module in stages for p in module.parameters()}
        self._releasable = [p for p in self._tensors
                            if isinstance(p, nn.Parameter) and id(p) in staged and id(p) not in held]
        self._shapes: dict[int, torch.Size] = {}

    @property
    def released(self) -> bool:
        return bool(self._shapes)

    def release(self) -> None:
        """Drop the storage of the parameters of stages this rank does not run (no-op when released)."""
        if self.released:
            return
        for p in self._releasable:
            self._shapes[id(p)] = p.shape
            p.grad = None
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def materialize(self) -> None:
        """Collective: every rank gets every parameter's and buffer's current value from its owner."""
        for t in self._tensors:
            if id(t) in self._shapes:
                t.data = torch.empty(self._shapes[id(t)], dtype=t.dtype, device=t.device)
            dist.broadcast(t.data, src=self._owners[id(t)])
        self._shapes.clear()

    def state_dict(self, dst: int = 0) -> dict[str, Any]:
        """Collective: ``root.state_dict()`` on ``dst`` with every tensor its owner's (elsewhere: the local one).

        Each owner sends each tensor once (a tied weight listed under two names arrives once and is
        the same tensor under both), so ``dst`` alone holds the whole model for the moment.
        """
        state = self.root.state_dict(keep_vars=True)
        fresh: dict[int, torch.Tensor] = {}
        for tag, t in enumerate(self._tensors):
            owner = self._owners[id(t)]
            if owner == dst:
                continue
            if self.rank == owner:
                dist.send(t.detach().contiguous(), dst=dst, tag=tag)
            elif self.rank == dst:
                fresh[id(t)] = torch.empty(self._shapes.get(id(t), t.shape), dtype=t.dtype, device=t.device)
                dist.recv(fresh[id(t)], src=owner, tag=tag)
        return {name: fresh.get(id(value), value).detach() if isinstance(value, torch.Tensor) else value
                for name, value in state.items()}

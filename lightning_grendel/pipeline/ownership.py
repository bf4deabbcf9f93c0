"""Which stages hold a parameter and which one rank speaks for it: the one rule clipping and checkpoints share.

A parameter is held by every rank of every stage (chunk) whose module contains it: the replicas of a
data-parallel stage mesh, the tensor-parallel ranks (full-sized tensors, each with its row block
trained), and every stage of a tied weight. After a pipelined step all holders have the same full
gradient (the stage reduction and the tied sum ran), so a sum over the world, such as a global
gradient norm or a checkpoint's optimizer state, takes each parameter once, from its *owner*: the
first rank of the mesh of the first stage holding it. A parameter no stage holds belongs to rank 0.
Buffers follow the same rule (a buffer a stage's forward updates is current on that stage's ranks).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from lightning_grendel.resharding.mesh import Mesh


def parameter_users(modules: Sequence[nn.Module]) -> dict[int, tuple[torch.Tensor, list[int]]]:
    """Per trainable parameter (by identity): the tensor and the stages (chunks) that hold it."""
    users: dict[int, tuple[torch.Tensor, list[int]]] = {}
    for index, module in enumerate(modules):
        for p in module.parameters():
            if p.requires_grad:
                users.setdefault(id(p), (p, []))[1].append(index)
    return users


def owners(tensors: Sequence[torch.Tensor], stages: Sequence[nn.Module], meshes: Sequence[Mesh]) -> list[int]:
    """Per parameter or buffer of ``tensors``, its owner rank (``meshes[c]`` is stage ``c``'s mesh)."""
    owner: dict[int, int] = {}
    for module, mesh in zip(stages, meshes, strict=True):
        for t in itertools.chain(module.parameters(), module.buffers()):
            owner.setdefault(id(t), mesh.ranks[0])
    return [owner.get(id(t), 0) for t in tensors]


def counted_parameters(params: Sequence[torch.Tensor], stages: Sequence[nn.Module], meshes: Sequence[Mesh],
                       rank: int) -> list[torch.Tensor]:
    """The parameters among ``params`` that ``rank`` owns: the ones it adds to a sum over the world.

    A parameter of no stage on this rank has no gradient here, so a norm over it adds nothing; a
    tied parameter is counted once, by the first stage holding it, after its parts were summed.
    """
    return [p for p, owner in zip(params, owners(params, stages, meshes), strict=True) if owner == rank]

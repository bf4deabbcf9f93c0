"""Weights shared by several stages (an embedding and its tied output head): one tensor, one gradient.

Each stage that uses a tied weight holds it and computes its part of the gradient (Megatron's
embedding group, DeepSpeed's ``TiedLayerSpec``); before the optimiser step the parts are summed among
the stage meshes holding it, so every holder takes the same step and the weights stay equal. Within
a mesh the stage's own gradient reduction has already summed the samples, so one rank per mesh adds
its mesh's part and every holder gets the sum.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from lightning_grendel.pipeline.ownership import parameter_users
from lightning_grendel.resharding.mesh import Mesh


def tie_parameters(modules: Sequence[nn.Module], groups: Sequence[Sequence[str]]) -> None:
    """Make each group of ``"<stage>.<name>"`` parameters one parameter: the first's (shapes must agree)."""
    for group in groups:
        first = None
        for entry in group:
            stage, _, name = entry.partition(".")
            if not stage.isdigit() or not 0 <= int(stage) < len(modules):
                raise ValueError(f"tied parameter {entry!r} must be '<stage index>.<parameter name>' with a stage "
                                 f"index below {len(modules)}")
            module = modules[int(stage)]
            names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
            if name not in names:
                close = difflib.get_close_matches(name, names, n=3)
                raise ValueError(f"tied parameter {entry!r}: stage {stage} has no parameter {name!r}"
                                 + (f"; did you mean {close}?" if close else ""))
            param = module.get_parameter(name)
            if first is None:
                first = (entry, param)
                continue
            if param.shape != first[1].shape or param.dtype != first[1].dtype:
                raise ValueError(f"tied parameters {first[0]!r} {tuple(first[1].shape)} {first[1].dtype} and {entry!r} "
                                 f"{tuple(param.shape)} {param.dtype} differ in shape or dtype; a tied group is one "
                                 "weight")
            owner, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner), leaf, first[1])


class TiedGradients:
    """Sums the gradient parts of parameters held by several stage meshes (collective construction)."""

    def __init__(self, modules: Sequence[nn.Module], chunk_meshes: Sequence[Mesh], rank: int,
                 timeout_s: float) -> None:
        buckets: dict[tuple[int, ...], list[torch.Tensor]] = {}
        for p, chunks in parameter_users(modules).values():
            meshes = sorted({chunk_meshes[c] for c in chunks}, key=lambda mesh: mesh.ranks[0])
            if len(meshes) > 1:
                ranks = tuple(sorted(r for mesh in meshes for r in mesh.ranks))
                buckets.setdefault(ranks, []).append(p)
        self._lead = any(rank == mesh.ranks[0] for mesh in chunk_meshes if rank in mesh.ranks)
        self._buckets = []
        for ranks in sorted(buckets):  # every rank makes every group, in one order
            group = dist.new_group(list(ranks), timeout=timedelta(seconds=timeout_s))
            if rank in ranks:
                self._buckets.append((group, buckets[ranks]))

    @property
    def tied(self) -> list[torch.Tensor]:
        """The tied parameters this rank holds."""
        return [p for _, params in self._buckets for p in params]

    def reduce(self) -> None:
        for group, params in self._buckets:
            parts = [p.grad if self._lead and p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([part.reshape(-1) for part in parts])
            dist.all_reduce(flat, group=group)
            offset = 0
            for p in params:
                p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()

"""Optimizer state of a pipeline in one checkpoint: every stage's part, merged by parameter index.

Each rank's optimizer only holds state for its own stage's parameters (the others never get a
gradient there). A checkpoint therefore gathers, per parameter, the state of one rank of the stage
that owns it; the merged dict has the layout of an unpipelined optimizer's ``state_dict()``, so it
loads with ``torch.load(..., weights_only=True)`` and also resumes a plain run. On resume each rank
keeps only its stage's entries, so it holds exactly the state it had before saving.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters in ``state_dict()`` index order (param groups one after another)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def local_indices(params: Sequence[torch.Tensor], stage: nn.Module) -> set[int]:
    """Indices whose state a rank keeps on resume: its own stage's (no other parameter gets a gradient there)."""
    mine = {id(p) for p in stage.parameters()}
    return {i for i, p in enumerate(params) if id(p) in mine}


def restrict_state(state_dict: Mapping[str, Any], keep: Iterable[int]) -> dict[str, Any]:
    """The same optimizer state dict with ``state`` limited to the indices in ``keep``."""
    keep = set(keep)
    return {**state_dict, "state": {i: s for i, s in state_dict["state"].items() if i in keep}}


def merge_states(parts: Sequence[Mapping[int, Any]]) -> dict[int, Any]:
    """Union of per-rank ``state`` dicts, which must not claim the same index twice, sorted by index."""
    merged: dict[int, Any] = {}
    for part in parts:
        for index, value in part.items():
            if index in merged:
                raise ValueError(f"optimizer state of parameter {index} came from two ranks")
            merged[index] = value
    return dict(sorted(merged.items()))


def gather_optimizer_state(optimizer: torch.optim.Optimizer, owners: Sequence[int], dst: int = 0) -> dict[str, Any]:
    """Collective: the full optimizer state dict on ``dst`` (an empty dict elsewhere).

    Every rank sends the entries it owns, so replicas of a stage are not sent twice.
    """
    state_dict = optimizer.state_dict()
    rank = dist.get_rank()
    mine = restrict_state(state_dict, (i for i, owner in enumerate(owners) if owner == rank))["state"]
    parts: list[Any] | None = [None] * dist.get_world_size() if rank == dst else None
    dist.gather_object(mine, parts, dst=dst)
    if rank != dst:
        return {}
    assert parts is not None
    return {**state_dict, "state": merge_states(parts)}

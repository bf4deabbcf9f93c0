"""Gaussians with Adam state as an order-free row multiset: checks that a resharded checkpoint lost nothing."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

KEYS = ("means", "scales", "quats", "opacities", "sh0", "shN")
MOMENTS = ("exp_avg", "exp_avg_sq")


def random_shard(count: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "means": torch.randn(count, 3, generator=g),
        "scales": torch.randn(count, 3, generator=g),
        "quats": torch.randn(count, 4, generator=g),
        "opacities": torch.randn(count, generator=g),
        "sh0": torch.randn(count, 1, 3, generator=g),
        "shN": torch.randn(count, 3, 3, generator=g),
    }


def adam_with_state(params: nn.ParameterDict) -> torch.optim.Adam:
    """One Adam step on random gradients, so every moment is non-zero and distinct."""
    optimizer = torch.optim.Adam([{"params": [p], "name": k} for k, p in params.items()], lr=0.1)
    for param in params.values():
        param.grad = torch.randn_like(param)
    optimizer.step()
    return optimizer


def row_multiset(params: dict[str, torch.Tensor], moments: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
    """Each Gaussian as one row of its parameters and moments, rows sorted: order-free comparison."""
    columns = []
    for key in sorted(params):
        tensors = [params[key]] + [moments[key][m] for m in MOMENTS]
        columns += [t.reshape(t.shape[0], params[key].shape[1:].numel()) for t in tensors]
    rows = torch.cat(columns, dim=1)
    return rows[torch.argsort(rows[:, 0])]


def loaded_rows(checkpoint: dict[str, Any]) -> torch.Tensor:
    """The :func:`row_multiset` of a loaded Grendel checkpoint (its Gaussians and their Adam moments)."""
    params = {k: checkpoint["state_dict"][f"gaussians.{k}"] for k in KEYS}
    optimizer_state = checkpoint["optimizer_states"][0]
    index_of = {group["name"]: group["params"][0] for group in optimizer_state["param_groups"]}
    state = optimizer_state["state"]
    return row_multiset(params, {k: {m: state[index_of[k]][m] for m in MOMENTS} for k in KEYS})

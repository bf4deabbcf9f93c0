"""Row edits on Gaussian parameters that keep the Adam state aligned with them.

Densification (clone, split, prune, opacity reset, MCMC relocation) and Grendel's redistribution change
the number of Gaussians or rewrite some; each edit swaps the ``nn.Parameter`` in the ``ParameterDict``
and in the optimiser's param group, and edits ``exp_avg`` / ``exp_avg_sq`` (and the per-row step count
``row_step`` of :class:`~.sparse_adam.VisibleAdam`) row for row: new or rewritten rows start from zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
ROW_STATE_KEYS = (*MOMENT_KEYS, "row_step")  # optimiser state with one entry per Gaussian row


def _swap(
    params: nn.ParameterDict,
    optimizer: torch.optim.Optimizer | None,
    key: str,
    value: Tensor,
    edit_moment: Callable[[str, Tensor], Tensor],
) -> None:
    old = params[key]
    new = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
    if optimizer is not None:
        for group in optimizer.param_groups:
            for index, param in enumerate(group["params"]):
                if param is old:
                    group["params"][index] = new
        state = optimizer.state.pop(old, None)
        if state:
            optimizer.state[new] = {
                name: edit_moment(name, tensor) if name in ROW_STATE_KEYS else tensor for name, tensor in state.items()
            }
    params[key] = new


def select_rows(params: nn.ParameterDict, optimizer: torch.optim.Optimizer | None, index: Tensor) -> None:
    """Keep (and reorder to) the rows ``index`` (bool mask or int64 indices) of every parameter."""
    for key in list(params.keys()):
        _swap(params, optimizer, key, params[key].detach()[index], lambda _name, t: t[index])


def append_rows(
    params: nn.ParameterDict,
    optimizer: torch.optim.Optimizer | None,
    rows: dict[str, Tensor],
    moments: dict[str, dict[str, Tensor]] | None = None,
) -> None:
    """Append new Gaussians; their Adam moments are ``moments[key][name]`` (zero when not given)."""
    for key in list(params.keys()):
        value = rows[key].to(params[key])
        added = {} if moments is None else moments.get(key, {})

        def grow(name: str, tensor: Tensor, value: Tensor = value, added: dict = added) -> Tensor:
            fresh = tensor.new_zeros((value.shape[0], *tensor.shape[1:]))  # row_step is [N], moments like value
            return torch.cat([tensor, added.get(name, fresh).to(tensor)])

        _swap(params, optimizer, key, torch.cat([params[key].detach(), value]), grow)


def overwrite_rows(
    params: nn.ParameterDict, optimizer: torch.optim.Optimizer | None, index: Tensor, rows: dict[str, Tensor]
) -> None:
    """Write ``rows[key]`` into rows ``index`` of every parameter and zero those rows' Adam moments.

    MCMC relocation: the rewritten rows are new Gaussians, so the moments of their old selves must not
    steer them. Repeated indices must carry equal rows.
    """
    for key in list(params.keys()):
        value = params[key].detach().clone()
        value[index] = rows[key].to(value)

        def zero_rows(_name: str, tensor: Tensor) -> Tensor:
            tensor = tensor.clone()
            tensor[index] = 0
            return tensor

        _swap(params, optimizer, key, value, zero_rows)


def replace_values(params: nn.ParameterDict, optimizer: torch.optim.Optimizer | None, key: str, value: Tensor) -> None:
    """Overwrite one parameter and zero its Adam moments (3DGS's opacity reset)."""
    _swap(params, optimizer, key, value.to(params[key]), lambda _name, t: torch.zeros_like(t))


def moments_of(params: nn.ParameterDict, optimizer: torch.optim.Optimizer | None) -> dict[str, dict[str, Tensor]]:
    """Adam moments per parameter key (zeros where the optimiser has no state yet)."""
    result: dict[str, dict[str, Tensor]] = {}
    for key, param in params.items():
        state = optimizer.state.get(param, {}) if optimizer is not None else {}
        result[key] = {name: state.get(name, torch.zeros_like(param)).detach() for name in MOMENT_KEYS}
    return result

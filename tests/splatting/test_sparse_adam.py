"""VisibleAdam against independent references: a dense torch Adam per row stepped only when the row is
visible (each row's own step clock), and torch's dense Adam when every row is visible at every step."""

from __future__ import annotations

import pytest
import torch

from lightning_grendel.splatting.gaussians import make_parameters
from lightning_grendel.splatting.param_surgery import append_rows, select_rows
from lightning_grendel.splatting.sparse_adam import VisibleAdam
from tests.helpers.scenes import random_gaussians

LR = {"means": 0.01, "scales": 0.005, "quats": 0.001, "opacities": 0.05, "sh0": 0.0025, "shN": 0.000125}


def _gradients(params, generator):
    return {key: torch.randn(param.shape, generator=generator) for key, param in params.items()}


def test_each_row_follows_dense_adam_on_its_own_step_clock():
    raw = random_gaussians(7, seed=3, sh_degree=1)
    params = make_parameters({k: v.clone() for k, v in raw.items()})
    sparse = VisibleAdam([{"params": [p], "lr": LR[k], "name": k} for k, p in params.items()], eps=1e-15)
    # The reference: one torch Adam per (parameter, row), stepped only on the steps its row is visible.
    rows = {key: [torch.nn.Parameter(raw[key][i].clone()) for i in range(7)] for key in raw}
    dense = {key: [torch.optim.Adam([row], lr=LR[key], eps=1e-15) for row in rows[key]] for key in raw}
    generator = torch.Generator().manual_seed(5)
    for _ in range(9):
        visible = torch.rand(7, generator=generator) < 0.5
        grads = _gradients(params, generator)
        for key, param in params.items():
            param.grad = grads[key] * visible.view(-1, *([1] * (param.dim() - 1)))  # unseen rows: zero gradient
            for i in torch.nonzero(visible).flatten().tolist():
                rows[key][i].grad = grads[key][i].clone()
                dense[key][i].step()
        sparse.set_visible(visible)
        sparse.step()
    for key, param in params.items():
        expected = torch.stack([row.detach() for row in rows[key]])
        torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-7, msg=key)
        steps = torch.tensor([float(dense[key][i].state[rows[key][i]].get("step", 0)) if dense[key][i].state
                              else 0.0 for i in range(7)])
        torch.testing.assert_close(sparse.state[param]["row_step"], steps, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("fused", [False, True])
def test_every_row_visible_is_dense_adam(fused):
    raw = random_gaussians(30, seed=1, sh_degree=2)
    runs = {}
    for name in ("dense", "visible"):
        params = make_parameters({k: v.clone() for k, v in raw.items()})
        groups = [{"params": [p], "lr": LR[k], "name": k} for k, p in params.items()]
        if name == "dense":
            optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), eps=1e-15, fused=fused)
        else:
            optimizer = VisibleAdam(groups, betas=(0.9, 0.999), eps=1e-15)
        generator = torch.Generator().manual_seed(2)
        for step in range(6):
            for key, grad in _gradients(params, generator).items():
                params[key].grad = grad
            if name == "visible" and step % 2:
                optimizer.set_visible(torch.ones(30, dtype=torch.bool))  # all visible, said explicitly
            optimizer.step()
        runs[name] = {k: v.detach() for k, v in params.items()}, optimizer, params
    (dense, dense_opt, dense_params), (visible, visible_opt, visible_params) = runs["dense"], runs["visible"]
    for key in dense:
        torch.testing.assert_close(visible[key], dense[key], rtol=1e-5, atol=1e-7, msg=key)
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(visible_opt.state[visible_params[key]][moment],
                                       dense_opt.state[dense_params[key]][moment], rtol=1e-6, atol=1e-10)


def test_densification_edits_the_row_clocks_with_the_rows():
    params = make_parameters(random_gaussians(4, seed=0, sh_degree=0))
    optimizer = VisibleAdam([{"params": [p], "lr": 0.01} for p in params.values()])
    for visible in ([True, True, False, True], [True, False, False, True], [True, True, True, True]):
        for param in params.values():
            param.grad = torch.ones_like(param)
        optimizer.set_visible(torch.tensor(visible))
        optimizer.step()
    assert optimizer.state[params["means"]]["row_step"].tolist() == [3.0, 2.0, 1.0, 3.0]
    select_rows(params, optimizer, torch.tensor([3, 1, 0]))  # prune row 2, reorder the rest
    append_rows(params, optimizer, {key: value.detach()[:2] for key, value in params.items()})  # two new rows
    for key, param in params.items():
        assert optimizer.state[param]["row_step"].tolist() == [3.0, 2.0, 3.0, 0.0, 0.0], key
        assert optimizer.state[param]["exp_avg"].shape == param.shape
    for param in params.values():
        param.grad = torch.ones_like(param)
    optimizer.set_visible(torch.tensor([False, False, False, True, True]))
    before = params["means"].detach().clone()
    optimizer.step()
    # A new row's first step is lr·sign(gradient), as Adam's first step is; the others stand still.
    torch.testing.assert_close(params["means"].detach()[3:], before[3:] - 0.01, rtol=0, atol=1e-7)
    torch.testing.assert_close(params["means"].detach()[:3], before[:3], rtol=0, atol=0)

"""MCMC densification: the relocation formula against independent computations, and the row edits."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_grendel.splatting.densify import Densifier, DensifyConfig
from lightning_grendel.splatting.gaussians import make_parameters
from lightning_grendel.splatting.mcmc import MCMCConfig, MCMCDensifier, make_densifier, relocated_opacity_and_scale
from tests.helpers.scenes import random_gaussians

pytestmark = pytest.mark.timeout(60)


def _paper_denominator(o_new: float, copies: int) -> float:
    """Eq. 9's double sum, term by term with exact binomials (no simplification)."""
    return sum(
        math.comb(i - 1, k) * (-1) ** k * o_new ** (k + 1) / math.sqrt(k + 1)
        for i in range(1, copies + 1)
        for k in range(i)
    )


@pytest.mark.parametrize("opacity", [0.02, 0.3, 0.7, 0.99])
@pytest.mark.parametrize("copies", [1, 2, 3, 7, 20])
def test_copies_composite_to_the_original_opacity_and_profile(opacity, copies):
    scales = torch.tensor([[0.5, 1.0, 2.0]], dtype=torch.float64)
    new_o, new_s = relocated_opacity_and_scale(
        torch.tensor([opacity], dtype=torch.float64), scales, torch.tensor([copies])
    )
    # N stacked copies composite to the original peak opacity ...
    assert 1 - (1 - float(new_o)) ** copies == pytest.approx(opacity, rel=1e-12)
    # ... and the paper's closed form (double sum with exact binomials) gives the same scale ...
    ratio = opacity / _paper_denominator(float(new_o), copies)
    torch.testing.assert_close(new_s, scales * ratio, rtol=1e-10, atol=0)
    # ... which keeps the integral of the composite profile along an axis (numerical quadrature).
    for axis in range(3):
        sigma_old, sigma_new = float(scales[0, axis]), float(new_s[0, axis])
        x = torch.linspace(-12 * sigma_old, 12 * sigma_old, 200_001, dtype=torch.float64)
        composite = 1 - (1 - float(new_o) * torch.exp(-0.5 * (x / sigma_new) ** 2)) ** copies
        original = opacity * torch.exp(-0.5 * (x / sigma_old) ** 2)
        assert torch.trapezoid(composite, x).item() == pytest.approx(torch.trapezoid(original, x).item(), rel=1e-6)


def test_one_copy_changes_nothing_and_float32_matches_float64():
    o = torch.tensor([0.1, 0.5, 0.9])
    s = torch.rand(3, 3) + 0.1
    new_o, new_s = relocated_opacity_and_scale(o, s, torch.ones(3, dtype=torch.int64))
    torch.testing.assert_close(new_o, o)
    torch.testing.assert_close(new_s, s)
    copies = torch.tensor([51, 30, 12])
    o32, s32 = relocated_opacity_and_scale(o, s, copies)
    o64, s64 = relocated_opacity_and_scale(o.double(), s.double(), copies)
    assert o32.dtype == torch.float32
    torch.testing.assert_close(o32.double(), o64, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s32.double(), s64, rtol=1e-5, atol=0)


def _params_with_adam(count: int, dead: list[int]) -> tuple[nn.ParameterDict, torch.optim.Adam]:
    raw = random_gaussians(count, seed=3, sh_degree=1)
    raw["opacities"] = torch.logit(torch.linspace(0.2, 0.9, count))
    raw["opacities"][dead] = torch.logit(torch.tensor(0.001))
    params = make_parameters(raw)
    optimizer = torch.optim.Adam([{"params": [p], "lr": 0.01} for p in params.values()])
    loss = sum(((p + 0.37) ** 2).sum() for p in params.values())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return params, optimizer


def test_relocation_moves_dead_rows_onto_live_ones_and_resets_their_moments():
    dead = [1, 4, 5]
    params, optimizer = _params_with_adam(8, dead)
    before = {k: v.detach().clone() for k, v in params.items()}
    densifier = MCMCDensifier(MCMCConfig(cap_max=8))
    moved = densifier.relocate(params, optimizer, torch.Generator().manual_seed(0))
    assert moved == 3 and params["means"].shape[0] == 8
    opacity = torch.sigmoid(params["opacities"].detach())
    assert (opacity > densifier.config.min_opacity).all()
    live = [i for i in range(8) if i not in dead]
    sources = []
    for row in dead:  # every dead row is now a copy of a live row's position and colour
        matches = [i for i in live if torch.equal(params["means"][row], before["means"][i])]
        assert len(matches) == 1 and torch.equal(params["sh0"][row], before["sh0"][matches[0]])
        sources.append(matches[0])
    for source in set(sources):
        copies = 1 + sources.count(source)
        expected_o, expected_s = relocated_opacity_and_scale(
            torch.sigmoid(before["opacities"][[source]]), before["scales"][[source]].exp(), torch.tensor([copies])
        )
        for row in [source] + [d for d, s in zip(dead, sources, strict=True) if s == source]:
            torch.testing.assert_close(opacity[row], expected_o[0])
            torch.testing.assert_close(params["scales"][row].exp(), expected_s[0])
    rewritten = set(dead) | set(sources)
    for key, param in params.items():
        state = optimizer.state[param]
        for name in ("exp_avg", "exp_avg_sq"):
            for row in range(8):
                if row in rewritten:
                    assert (state[name][row] == 0).all(), (key, name, row)
                else:
                    assert (state[name][row] != 0).any(), (key, name, row)
                    torch.testing.assert_close(param[row].detach(), before[key][row])


def test_growth_stops_at_the_budget_with_zero_moments_for_new_rows():
    params, optimizer = _params_with_adam(40, dead=[])
    densifier = MCMCDensifier(MCMCConfig(cap_max=45, growth=0.05))
    generator = torch.Generator().manual_seed(1)
    assert densifier.grow(params, optimizer, generator) == 2  # int(1.05 * 40) - 40
    assert params["means"].shape[0] == 42
    for param in params.values():
        assert (optimizer.state[param]["exp_avg"][40:] == 0).all()
    while densifier.grow(params, optimizer, generator):
        pass
    assert params["means"].shape[0] == 45
    assert all(p.shape[0] == 45 for p in params.values())
    assert all(optimizer.state[p]["exp_avg_sq"].shape[0] == 45 for p in params.values())


def test_shards_split_the_budget_and_the_regulariser_takes_scene_wide_means():
    shares = []
    for rank in range(3):
        densifier = MCMCDensifier(MCMCConfig(cap_max=100))
        densifier.set_shard(rank, 3)
        shares.append(densifier.capacity)
    assert shares == [34, 33, 33]
    with pytest.raises(ValueError, match="cap_max=2 leaves rank 2"):
        MCMCDensifier(MCMCConfig(cap_max=2)).set_shard(2, 3)

    raw = random_gaussians(10, seed=5, sh_degree=0)
    densifier = MCMCDensifier(MCMCConfig(opacity_reg=0.3, scale_reg=0.7))
    whole = densifier.regularization(raw, torch.mean)
    expected = 0.3 * torch.sigmoid(raw["opacities"]).mean() + 0.7 * raw["scales"].exp().mean()
    torch.testing.assert_close(whole, expected)


def test_noise_follows_the_covariance_and_spares_opaque_gaussians():
    raw = random_gaussians(6, seed=7, sh_degree=0)
    raw["opacities"] = torch.logit(torch.tensor([0.001, 0.002, 0.003, 0.5, 0.9, 0.99]))
    params = make_parameters(raw)
    before = params["means"].detach().clone()
    densifier = MCMCDensifier(MCMCConfig(noise_lr=1e3))
    densifier.add_noise(params, 1e-2, torch.Generator().manual_seed(4))
    epsilon = torch.randn(6, 3, generator=torch.Generator().manual_seed(4))
    # Independent covariance: R diag(s^2) R^T with R from the normalised quaternion (scipy convention).
    from scipy.spatial.transform import Rotation

    q = raw["quats"] / raw["quats"].norm(dim=1, keepdim=True)
    rotation = torch.from_numpy(Rotation.from_quat(q[:, [1, 2, 3, 0]].numpy()).as_matrix()).float()
    covariance = rotation @ torch.diag_embed(raw["scales"].exp() ** 2) @ rotation.transpose(1, 2)
    gate = 1 / (1 + torch.exp(-100 * ((1 - torch.sigmoid(raw["opacities"])) - 0.995)))
    expected = before + (covariance @ (epsilon * (gate * 1e-2 * 1e3)[:, None])[..., None])[..., 0]
    torch.testing.assert_close(params["means"].detach(), expected, rtol=1e-4, atol=1e-7)
    assert (params["means"][3:] - before[3:]).abs().max() < 1e-3 * (params["means"][:3] - before[:3]).abs().max()


def test_schedule_and_dispatch():
    densifier = MCMCDensifier(MCMCConfig(start_images=10, stop_images=50, every_images=10))
    assert not densifier.is_refine_step(9, 10) and densifier.is_refine_step(19, 20)
    assert densifier.is_refine_step(48, 50) and not densifier.is_refine_step(50, 60)
    assert isinstance(make_densifier(None), Densifier) and isinstance(make_densifier(DensifyConfig()), Densifier)
    assert isinstance(make_densifier(MCMCConfig()), MCMCDensifier)
    with pytest.raises(TypeError, match="DensifyConfig or an MCMCConfig"):
        make_densifier({"cap_max": 3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cap_max"):
        MCMCConfig(cap_max=0)


def test_a_recipe_selects_mcmc_and_antialiasing():
    from jsonargparse import ArgumentParser

    from lightning_grendel.splatting.module import GaussianSplattingModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(GaussianSplattingModule, "model")
    recipe = (
        "model:\n  rasterize_mode: antialiased\n  densify:\n"
        "    class_path: lightning_grendel.splatting.mcmc.MCMCConfig\n    init_args: {cap_max: 1234}\n"
    )
    module = parser.instantiate(parser.parse_string(recipe)).model
    assert isinstance(module.densifier, MCMCDensifier) and module.densifier.capacity == 1234
    assert module.renderer.rasterize_mode == "antialiased"
    plain = parser.instantiate(parser.parse_string("model:\n  densify: {start_images: 7}\n")).model
    assert isinstance(plain, GaussianSplattingModule) and plain.densifier.config.start_images == 7

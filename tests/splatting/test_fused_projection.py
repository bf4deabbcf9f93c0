"""The fused C++ projection + SH colour against the torch reference (project_gaussians, sh_to_rgb)."""

from __future__ import annotations

import pytest
import torch

from lightning_grendel.splatting.cameras import Cameras
from lightning_grendel.splatting.fused_projection import (
    fused_projection_available,
    load_extension,
    project_and_shade,
)
from lightning_grendel.splatting.gaussians import activated_scales, sh_coefficients
from lightning_grendel.splatting.projection import project_gaussians
from lightning_grendel.splatting.render import splat_gaussians
from lightning_grendel.splatting.sh import sh_to_rgb
from tests.helpers.scenes import orbit_cameras, random_gaussians

pytestmark = pytest.mark.skipif(load_extension() is None, reason="the C++ projection extension cannot be built")


def scene(count: int, dtype: torch.dtype, seed: int = 0, spread: float = 1.0) -> tuple[dict, Cameras]:
    """Gaussians spread ``spread`` x the unit cube (so some fall behind, off image or past the FOV clamp)."""
    gaussians = random_gaussians(count, seed, dtype, sh_degree=3)
    gaussians["means"] = gaussians["means"] * spread
    cameras = orbit_cameras(3, 48, 36)
    return gaussians, cameras


def reference(gaussians: dict, cameras: Cameras, degree: int, mode: str):
    means, quats, scales = gaussians["means"], gaussians["quats"], activated_scales(gaussians)
    projected = project_gaussians(means, quats, scales, cameras, mode)
    directions = means[None] - cameras.centers.to(means.dtype)[:, None]
    return projected, sh_to_rgb(degree, sh_coefficients(gaussians)[None], directions)


def fused(gaussians: dict, cameras: Cameras, degree: int, mode: str):
    return project_and_shade(gaussians["means"], gaussians["quats"], activated_scales(gaussians),
                             sh_coefficients(gaussians), cameras, degree, mode)


def outputs(projected, colors) -> list[torch.Tensor]:
    extra = [] if projected.compensations is None else [projected.compensations]
    return [projected.means2d, projected.conics, projected.depths, colors, *extra]


@pytest.mark.parametrize("mode", ["classic", "antialiased"])
@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_forward_matches_torch_float64(degree, mode):
    gaussians, cameras = scene(400, torch.float64, spread=6.0)
    want_proj, want_colors = reference(gaussians, cameras, degree, mode)
    got_proj, got_colors = fused(gaussians, cameras, degree, mode)
    radii = want_proj.radii
    assert (radii == 0).any() and (radii > 0).any(), "the scene must have culled and visible pairs"
    assert (want_proj.depths <= 0.01).any(), "some pairs must lie behind the near plane"
    torch.testing.assert_close(got_proj.radii, radii, rtol=0, atol=0)
    for got, want in zip(outputs(got_proj, got_colors), outputs(want_proj, want_colors), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_forward_exercises_the_fov_clamp():
    gaussians, cameras = scene(400, torch.float64, spread=6.0)
    projected, _ = reference(gaussians, cameras, 3, "classic")
    fx, cx, width = cameras.intrinsics[0, 0, 0].item(), cameras.intrinsics[0, 0, 2].item(), cameras.width
    u = (projected.means2d[..., 0] - cx) / fx
    assert ((u > (width - cx) / fx + 0.3 * 0.5 * width / fx) & (projected.depths > 0.01)).any()


@pytest.mark.parametrize("mode", ["classic", "antialiased"])
def test_forward_matches_torch_float32(mode):
    gaussians, cameras = scene(400, torch.float32)
    want_proj, want_colors = reference(gaussians, cameras, 3, mode)
    got_proj, got_colors = fused(gaussians, cameras, 3, mode)
    for got, want in zip(outputs(got_proj, got_colors), outputs(want_proj, want_colors), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got_proj.radii != want_proj.radii).float().mean() < 0.01  # ceil() may round a hair differently


def test_extra_bands_are_ignored_and_get_zero_gradient():
    gaussians, cameras = scene(50, torch.float64)
    coefficients = sh_coefficients(gaussians).requires_grad_()
    args = (gaussians["means"], gaussians["quats"], activated_scales(gaussians))
    _, colors = project_and_shade(*args, coefficients, cameras, 1)
    _, want = project_and_shade(*args, coefficients[:, :4].detach(), cameras, 1)
    torch.testing.assert_close(colors, want, rtol=0, atol=0)
    colors.sum().backward()
    assert (coefficients.grad[:, 4:] == 0).all() and (coefficients.grad[:, :4] != 0).any()


def leaf_inputs(gaussians: dict) -> dict:
    keys = ("means", "quats", "scales", "sh0", "shN")
    return {k: (gaussians[k].detach().clone().requires_grad_() if k in keys else gaussians[k]) for k in gaussians}


def weighted_sum(projected, colors, seed: int) -> torch.Tensor:
    """A random linear functional of every differentiable output (so every upstream gradient is non-zero)."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for tensor in outputs(projected, colors):
        total = total + (tensor * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)).sum()
    return total


@pytest.mark.parametrize("mode", ["classic", "antialiased"])
@pytest.mark.parametrize("degree", [0, 1, 3])
def test_gradients_match_autograd_float64(degree, mode):
    gaussians, cameras = scene(300, torch.float64, spread=4.0)
    grads = []
    for run in (reference, fused):
        leaves = leaf_inputs(gaussians)
        weighted_sum(*run(leaves, cameras, degree, mode), seed=1).backward()
        grads.append([leaves[k].grad for k in ("means", "quats", "scales", "sh0", "shN")])
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_gradients_at_exact_clamp_ties_match_autograd():
    """Where an input sits exactly on a clamp, torch's clamp_min passes no gradient; the C++ must agree."""
    gaussians, cameras = scene(20, torch.float64)
    gaussians["sh0"][:4, 0, 0] = -1.772453850905516  # SH_C0 * c + 0.5 == 0 exactly: colour on its clamp
    gaussians["means"][4] = cameras.centers[0]  # a direction of length 0 from camera 0: the norm's clamp
    grads = []
    for run in (reference, fused):
        leaves = leaf_inputs(gaussians)
        projected, colors = run(leaves, cameras, 0, "classic")
        assert (colors[:, :4, 0] == 0).all()
        weighted_sum(projected, colors, seed=2).backward()
        grads.append([leaves[k].grad for k in ("means", "sh0")])
    assert (grads[0][1][:4, 0, 0] == 0).all(), "the reference passes no gradient on the tie"
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_gradcheck_small_scene():
    gaussians, cameras = scene(6, torch.float64, seed=3, spread=0.5)
    coefficients = sh_coefficients(gaussians)

    def function(means, quats, scales, coefs):
        projected, colors = project_and_shade(means, quats, scales, coefs, cameras, 3, "antialiased")
        return (*outputs(projected, colors),)

    inputs = [t.detach().clone().requires_grad_() for t in
              (gaussians["means"], gaussians["quats"], gaussians["scales"].exp(), coefficients)]
    assert torch.autograd.gradcheck(function, inputs)


def test_bit_identical_for_any_thread_count():
    gaussians, cameras = scene(2000, torch.float32, spread=3.0)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            leaves = leaf_inputs(gaussians)
            projected, colors = fused(leaves, cameras, 3, "antialiased")
            weighted_sum(projected, colors, seed=2).backward()
            results.append([*outputs(projected, colors), *(leaves[k].grad for k in ("means", "quats", "scales"))])
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


def test_cameras_requiring_grad_fall_back_to_torch():
    gaussians, cameras = scene(20, torch.float64)
    args = (gaussians["means"], gaussians["quats"], activated_scales(gaussians), sh_coefficients(gaussians))
    assert fused_projection_available(*args, cameras)
    cameras.world_to_camera = cameras.world_to_camera.double().requires_grad_()
    assert not fused_projection_available(*args, cameras)
    splats = splat_gaussians(gaussians, cameras, 3)  # "auto" takes the torch path and keeps the camera gradient
    splats.means2d.sum().backward()
    assert cameras.world_to_camera.grad is not None
    with pytest.raises(ValueError, match="cpp"):
        splat_gaussians(gaussians, cameras, 3, projection="cpp")


@pytest.mark.parametrize("mode", ["classic", "antialiased"])
def test_splat_gaussians_same_on_both_paths(mode):
    gaussians, cameras = scene(200, torch.float64, spread=2.0)
    results = []
    for projection in ("torch", "cpp"):
        leaves = leaf_inputs(gaussians)
        splats = splat_gaussians(leaves, cameras, 3, mode, projection=projection)
        assert not splats.means2d.is_leaf
        splats.means2d.retain_grad()
        total = (splats.colors.sum() + splats.opacities.sum() + splats.conics.sum() + splats.means2d.sum()
                 + splats.depths.sum())
        total.backward()
        results.append([splats.radii, splats.means2d, splats.conics, splats.colors, splats.opacities, splats.depths,
                        splats.means2d.grad, *(leaves[k].grad for k in ("means", "quats", "scales", "sh0", "shN"))])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["classic", "antialiased"])
def test_sh_bands_apart_equal_the_joined_coefficients_bit_for_bit(mode):
    """``(sh0, shN)`` given apart (what splat_gaussians passes, so no joined copy is saved for backward) give the
    same outputs and the same gradients as the joined [N, 16, 3] tensor, to the bit."""
    results = []
    for apart in (False, True):
        gaussians, cameras = scene(300, torch.float32, seed=4, spread=2.0)
        params = {key: value.clone().requires_grad_(True) for key, value in gaussians.items()}
        bands = (params["sh0"], params["shN"]) if apart else sh_coefficients(params)
        projected, colors = project_and_shade(params["means"], params["quats"], activated_scales(params), bands,
                                              cameras, 3, mode)
        values = outputs(projected, colors)
        weights = [torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) for i, v in enumerate(values)]
        sum((v * w).sum() for v, w in zip(values, weights, strict=True)).backward()
        results.append(([v.detach() for v in values], {key: p.grad for key, p in params.items()}))
    (joined_values, joined_grads), (apart_values, apart_grads) = results
    assert all(torch.equal(a, b) for a, b in zip(joined_values, apart_values, strict=True))
    assert all(torch.equal(joined_grads[key], apart_grads[key]) for key in ("means", "quats", "scales", "sh0", "shN"))
    assert apart_grads["sh0"].is_contiguous() and apart_grads["shN"].is_contiguous()

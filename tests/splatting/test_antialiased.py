"""Anti-aliased rendering (Mip-Splatting's 2-D filter with opacity compensation) in projection and backends."""

from __future__ import annotations

import pytest
import torch

from lightning_grendel.splatting.gaussians import make_parameters
from lightning_grendel.splatting.projection import LOW_PASS, project_gaussians
from lightning_grendel.splatting.rasterize import cpp_backend
from lightning_grendel.splatting.render import SingleProcessRenderer
from tests.helpers.scenes import orbit_cameras, random_gaussians

pytestmark = pytest.mark.timeout(120)


def test_compensation_matches_the_determinants_of_the_filtered_covariance():
    g = random_gaussians(200, seed=2, dtype=torch.float64)
    cameras = orbit_cameras(2, 64, 48)
    classic = project_gaussians(g["means"], g["quats"], g["scales"].exp(), cameras)
    aa = project_gaussians(g["means"], g["quats"], g["scales"].exp(), cameras, "antialiased")
    assert classic.compensations is None
    torch.testing.assert_close(aa.conics, classic.conics)  # same 0.3 px² dilation in both modes
    a, b, c = aa.conics.unbind(-1)
    conic = torch.stack([a, b, b, c], -1).reshape(*a.shape, 2, 2)
    filtered = torch.linalg.inv(conic)  # Σ + 0.3 I
    unfiltered = filtered - LOW_PASS * torch.eye(2, dtype=torch.float64)
    expected = (torch.linalg.det(unfiltered) / torch.linalg.det(filtered)).clamp_min(0).sqrt()
    visible = aa.radii > 0
    torch.testing.assert_close(aa.compensations[visible], expected[visible], rtol=1e-8, atol=1e-10)
    assert ((aa.compensations > 0) & (aa.compensations <= 1)).all()
    assert aa.compensations[visible].min() < 0.9  # the scene has sub-pixel splats the filter dims


def test_compensation_gradients_float64():
    g = random_gaussians(6, seed=4, dtype=torch.float64)
    g["scales"] = g["scales"] + 1.5  # well-conditioned, visible splats
    cameras = orbit_cameras(1, 32, 32)
    inputs = tuple(g[k].clone().requires_grad_(True) for k in ("means", "quats", "scales"))

    def compensation(means, quats, log_scales):
        return project_gaussians(means, quats, log_scales.exp(), cameras, "antialiased").compensations

    assert torch.autograd.gradcheck(compensation, inputs, eps=1e-6, atol=1e-6)


def _render(backend: str, mode: str, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    params = make_parameters(random_gaussians(300, seed=seed, sh_degree=1))
    cameras = orbit_cameras(2, 40, 36)
    renderer = SingleProcessRenderer(backend, rasterize_mode=mode)
    result = renderer(params, cameras, 1, torch.zeros(3))
    images = torch.stack([view.image for view in result.views])
    (images * torch.linspace(0, 1, images.numel()).reshape(images.shape)).sum().backward()
    return images.detach(), {k: p.grad for k, p in params.items()}


@pytest.mark.skipif(not cpp_backend.cpp_available(), reason="the C++ rasterizer did not build")
def test_cpp_matches_torch_in_antialiased_mode():
    torch_image, torch_grads = _render("torch", "antialiased")
    cpp_image, cpp_grads = _render("cpp", "antialiased")
    torch.testing.assert_close(cpp_image, torch_image, rtol=1e-4, atol=1e-5)
    for key in torch_grads:
        torch.testing.assert_close(cpp_grads[key], torch_grads[key], rtol=1e-3, atol=1e-5)
    classic_image, _ = _render("torch", "classic")
    assert (classic_image - torch_image).abs().max() > 1e-2  # the mode changes the picture
    assert classic_image.sum() > torch_image.sum()  # compensation only ever dims


def test_unknown_mode_is_refused():
    g = random_gaussians(3)
    with pytest.raises(ValueError, match="rasterize_mode must be 'classic' or 'antialiased'"):
        project_gaussians(g["means"], g["quats"], g["scales"].exp(), orbit_cameras(1, 8, 8), "mip")

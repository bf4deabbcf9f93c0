"""The glue around gsplat's fused projection, on the CPU: a stand-in ``gsplat`` with its conventions
(per-axis radii, unwritten memory in culled pairs, SH without the +0.5) built from the torch reference.
The real kernels are checked against the reference in ``test_cuda_paths.py`` on a GPU."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch

from lightning_grendel.splatting.gaussians import activated_scales, sh_coefficients
from lightning_grendel.splatting.gsplat_projection import project_and_shade_gsplat
from lightning_grendel.splatting.projection import project_gaussians
from lightning_grendel.splatting.rasterize import rasterize
from lightning_grendel.splatting.render import splat_gaussians
from lightning_grendel.splatting.sh import num_sh_bases, sh_bases, sh_to_rgb
from tests.helpers.scenes import orbit_cameras, random_gaussians


def _fake_gsplat(cameras, per_axis_radii: bool) -> types.ModuleType:
    """``fully_fused_projection`` / ``spherical_harmonics`` with gsplat's outputs, from the reference maths:
    radii per axis [C, N, 2] as in gsplat >= 1.5, or one per pair [C, N] as before."""

    def fully_fused_projection(means, covars, quats, scales, viewmats, ks, width, height, eps2d, near_plane,
                               calc_compensations):
        assert covars is None and eps2d == 0.3 and near_plane == 0.01
        mode = "antialiased" if calc_compensations else "classic"
        projected = project_gaussians(means, quats, scales, cameras, mode)
        culled = projected.radii == 0
        nan = torch.tensor(float("nan"))
        means2d = torch.where(culled[..., None], nan, projected.means2d)  # gsplat leaves these unwritten
        conics = torch.where(culled[..., None], nan, projected.conics)
        radii = projected.radii
        if per_axis_radii:
            radii = torch.stack([projected.radii, (projected.radii - 1).clamp_min(1)], dim=-1)
            radii = torch.where(culled[..., None], 0, radii)
        return radii, means2d, projected.depths, conics, projected.compensations

    def spherical_harmonics(degree, dirs, coeffs):
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        return (sh_bases(degree, dirs)[..., None] * coeffs[..., : num_sh_bases(degree), :]).sum(-2)

    module = types.ModuleType("gsplat")
    module.fully_fused_projection, module.spherical_harmonics = fully_fused_projection, spherical_harmonics
    return module


@pytest.mark.parametrize("per_axis_radii", [True, False])
@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
def test_glue_gives_the_reference_splats_with_zeroed_culled_pairs(monkeypatch, rasterize_mode, per_axis_radii):
    raw = random_gaussians(400, seed=2, sh_degree=3)
    raw["means"] = raw["means"] * 3  # some pairs off the image or behind the camera
    cameras = orbit_cameras(2, 64, 48)
    monkeypatch.setitem(sys.modules, "gsplat", _fake_gsplat(cameras, per_axis_radii))
    means, quats, scales, coefficients = raw["means"], raw["quats"], activated_scales(raw), sh_coefficients(raw)

    projected, colors = project_and_shade_gsplat(means, quats, scales, coefficients, cameras, 2, rasterize_mode)
    reference = project_gaussians(means, quats, scales, cameras, rasterize_mode)
    kept = reference.radii > 0
    assert 0 < int(kept.sum()) < kept.numel()
    torch.testing.assert_close(projected.radii, reference.radii)  # the larger axis
    for name in ("means2d", "conics", "depths") + (("compensations",) if rasterize_mode == "antialiased" else ()):
        ours, ref = getattr(projected, name), getattr(reference, name)
        torch.testing.assert_close(ours[kept], ref[kept], msg=name)
        assert (ours[~kept] == 0).all(), name
    directions = means[None] - cameras.centers[:, None]
    torch.testing.assert_close(colors, sh_to_rgb(2, coefficients[None], directions))
    assert projected.compensations is None if rasterize_mode == "classic" else projected.compensations is not None


def _gsplat_style_radii(splats, width: int, height: int):
    """gsplat 1.5's culling and tile radius (3.33 sigma per axis, the larger axis) from the reference splats."""
    a_inv, b_inv, c_inv = splats.conics.detach().unbind(-1)
    det_inv = a_inv * c_inv - b_inv * b_inv
    radius_x, radius_y = torch.ceil(3.33 * (c_inv / det_inv).sqrt()), torch.ceil(3.33 * (a_inv / det_inv).sqrt())
    x, y = splats.means2d.detach().unbind(-1)
    on_image = (x + radius_x > 0) & (x - radius_x < width) & (y + radius_y > 0) & (y - radius_y < height)
    return torch.where((splats.depths > 0.01) & on_image, torch.maximum(radius_x, radius_y), 0).to(torch.int32)


def test_gsplat_radius_convention_stays_inside_the_cuda_tests_tolerances():
    """test_cuda_paths compares gsplat-projected renders with the reference at 2e-4 (image) and 1e-3 / 5e-4
    (gradients): the change of tile radius alone, on that test's scene, must fit inside those bounds."""
    raw = random_gaussians(2000, seed=3, sh_degree=3)
    raw["scales"] = raw["scales"] - 0.5
    cameras = orbit_cameras(1, 96, 80)
    background = torch.tensor([0.1, 0.2, 0.3])
    renders = {}
    for convention in ("reference", "gsplat"):
        params = {k: v.clone().requires_grad_(True) for k, v in raw.items()}
        splats = splat_gaussians(params, cameras, 3, projection="torch")
        if convention == "gsplat":
            splats = dataclasses.replace(splats, radii=_gsplat_style_radii(splats, 96, 80))
        image = rasterize(*splats.camera(0).tensors(), 96, 80, background, backend="torch")
        (image * torch.rand(image.shape, generator=torch.Generator().manual_seed(4))).sum().backward()
        renders[convention] = image.detach(), {k: p.grad for k, p in params.items()}, splats.radii
    (ref_image, ref_grads, ref_radii), (image, grads, radii) = renders["reference"], renders["gsplat"]
    assert not torch.equal(radii, ref_radii)  # the conventions do differ on this scene
    torch.testing.assert_close(image, ref_image, rtol=0, atol=2e-4)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-3, atol=5e-4 * ref.abs().max().item(), msg=name)

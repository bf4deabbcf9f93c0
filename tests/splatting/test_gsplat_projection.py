"""The glue around gsplat's fused projection, on the CPU: a stand-in ``gsplat`` with its conventions
(per-axis radii, unwritten memory in culled pairs, SH without the +0.5) built from the torch reference.
The real kernels are checked against the reference in ``test_cuda_paths.py`` on a GPU."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from lightning_grendel.splatting.gaussians import activated_scales, sh_coefficients
from lightning_grendel.splatting.gsplat_projection import project_and_shade_gsplat
from lightning_grendel.splatting.projection import project_gaussians
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

"""The C++ rasterizer against the PyTorch reference: images, every gradient, determinism and fallback."""

from __future__ import annotations

import logging

import pytest
import torch

from lightning_grendel.splatting.projection import project_gaussians
from lightning_grendel.splatting.rasterize import cpp_backend as rasterize_cpp
from lightning_grendel.splatting.rasterize import rasterize, resolve_backend
from lightning_grendel.splatting.rasterize.gsplat_backend import gsplat_available
from lightning_grendel.splatting.rasterize.splats import Splats
from tests.helpers.scenes import orbit_cameras, projected_splats, random_gaussians

pytestmark = pytest.mark.skipif(not rasterize_cpp.cpp_available(), reason="the C++ rasterizer did not build")

PARAMS = ("means2d", "conics", "colors", "opacities")


def special_splats(width: int, height: int, channels: int, seed: int) -> dict:
    """Hand-made splats for the corner cases: huge, sub-pixel, saturating, opaque stack, off-screen,
    indefinite conic, equal depths."""
    g = torch.Generator().manual_seed(seed)
    centre = [width / 2, height / 2]
    rows = [  # (mx, my, a, b, c, opacity, radius)
        (*centre, 1e-4, 0.0, 2e-4, 0.6, 400),  # huge: covers the image
        (width * 0.3, height * 0.6, 25.0, 3.0, 30.0, 0.9, 1),  # tiny: sub-pixel
        (width * 0.7, height * 0.3, 0.02, 0.005, 0.03, 1.0, 25),  # saturating: alpha clamped at 0.99
        (-30.0, height * 0.5, 0.01, 0.0, 0.01, 0.8, 40),  # centre off-screen, reaches in
        (width + 20.0, height + 25.0, 0.005, 0.0, 0.005, 0.8, 50),  # centre off-screen, corner
        (width * 0.5, height * 0.2, 0.1, 0.12, 0.1, 0.7, 8),  # indefinite conic: sigma < 0 in places
        (width + 500.0, -500.0, 0.1, 0.0, 0.1, 0.9, 3),  # box entirely off-screen
    ]
    rows += [(width * 0.4, height * 0.45, 0.05, 0.01, 0.04, 0.97, 12)] * 8  # opaque stack: early termination
    means = torch.tensor([r[:2] for r in rows])
    conics = torch.tensor([r[2:5] for r in rows])
    opacities = torch.tensor([r[5] for r in rows])
    radii = torch.tensor([r[6] for r in rows], dtype=torch.int32)
    depths = torch.rand(len(rows), generator=g) * 3 + 1
    depths[-8:] = depths[-8:].sort().values
    depths[-3] = depths[-4]  # a depth tie: both backends must keep the splat order
    colors = torch.rand(len(rows), channels, generator=g)
    return {"means2d": means, "conics": conics, "colors": colors, "opacities": opacities, "depths": depths,
            "radii": radii}


def camera_inside_cloud(count: int, width: int, height: int, channels: int, seed: int) -> dict:
    """A camera inside the cloud: Gaussians behind it (culled) and very close ones (huge splats)."""
    gaussians = random_gaussians(count, seed)
    cameras = orbit_cameras(1, width, height, radius=0.7)
    proj = project_gaussians(gaussians["means"], gaussians["quats"], gaussians["scales"].exp(), cameras)
    g = torch.Generator().manual_seed(seed + 7)
    return {"means2d": proj.means2d[0], "conics": proj.conics[0], "colors": torch.rand(count, channels, generator=g),
            "opacities": torch.sigmoid(gaussians["opacities"] * 2), "depths": proj.depths[0], "radii": proj.radii[0]}


def mixed_scene(width: int, height: int, channels: int = 3, seed: int = 0, dtype=torch.float32) -> dict:
    ordinary = projected_splats(400, width, height, seed)
    g = torch.Generator().manual_seed(seed + 3)
    ordinary["colors"] = torch.rand(400, channels, generator=g)
    ordinary["opacities"] = ordinary["opacities"].clamp(0.2, 1.0)
    inside = camera_inside_cloud(300, width, height, channels, seed)
    parts = [ordinary, inside, special_splats(width, height, channels, seed)]
    scene = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    assert (scene["radii"] == 0).any() and (scene["radii"] > 200).any()
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in scene.items()}


def render(scene: dict, backend: str, width: int, height: int, rows: tuple[int, int], background: torch.Tensor,
           device: str = "cpu"):
    """Image and gradients (on the CPU) of a fixed random projection of it, rendered on ``device``."""
    params = {k: v.detach().clone().to(device).requires_grad_(k in PARAMS) for k, v in scene.items()}
    image = rasterize(**params, width=width, height=height, background=background.to(device), row_start=rows[0],
                      row_end=rows[1], backend=backend).cpu()
    weights = torch.randn(image.shape, generator=torch.Generator().manual_seed(5), dtype=image.dtype)
    (image * weights).sum().backward()
    return image.detach(), {k: params[k].grad.cpu() for k in PARAMS}


def assert_parity(scene: dict, width: int, height: int, rows: tuple[int, int], backend: str = "cpp",
                  device: str = "cpu", image_atol: float = 1e-5) -> None:
    channels = scene["colors"].shape[1]
    background = torch.linspace(0.1, 0.9, channels, dtype=scene["colors"].dtype)
    ref_image, ref_grads = render(scene, "torch", width, height, rows, background)
    image, grads = render(scene, backend, width, height, rows, background, device)
    assert image.shape == (rows[1] - rows[0], width, channels)
    torch.testing.assert_close(image, ref_image, rtol=0, atol=image_atol)
    for name in PARAMS:
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5 * scale + 1e-7, msg=name)


@pytest.mark.parametrize("rows", [(0, 61), (5, 29), (16, 48), (33, 34), (60, 61)])
def test_cpp_matches_torch_on_mixed_scenes(rows):
    assert_parity(mixed_scene(75, 61), 75, 61, rows)


@pytest.mark.parametrize("channels", [1, 5])
def test_cpp_matches_torch_for_other_channel_counts(channels):
    assert_parity(mixed_scene(40, 36, channels=channels, seed=2), 40, 36, (0, 36))


def test_cpp_matches_torch_in_float64():
    assert_parity(mixed_scene(40, 36, seed=4, dtype=torch.float64), 40, 36, (3, 30))


def test_early_termination_is_reached():
    """The opaque stack drives some pixels below the 1e-4 transmittance threshold."""
    scene = special_splats(48, 48, 3, seed=0)
    ext = rasterize_cpp.load_extension()
    splats = Splats(*(scene[k] for k in ("means2d", "conics", "colors", "opacities", "depths", "radii")))
    inputs = rasterize_cpp.prepare_inputs(splats, torch.zeros(3))
    means2d, conics, colors, opacities, depths, background, radii = inputs
    _, final_t, last, *_ = ext.forward(means2d, conics, colors, opacities, depths, radii, 48, 48, background, 0, 48)
    assert final_t.min() < 1e-3 and (last >= 0).any()
    assert_parity(scene, 48, 48, (0, 48))


@pytest.mark.parametrize("case", ["no splats", "all culled", "empty row range"])
def test_empty_images_give_the_background(case):
    scene = mixed_scene(32, 32)
    if case == "no splats":
        scene = {k: v[:0] for k, v in scene.items()}
    elif case == "all culled":
        scene["radii"] = torch.zeros_like(scene["radii"])
    rows = (7, 7) if case == "empty row range" else (0, 32)
    background = torch.tensor([0.25, 0.5, 0.75])
    params = {k: v.clone().requires_grad_(k in PARAMS) for k, v in scene.items()}
    image = rasterize(**params, width=32, height=32, background=background, row_start=rows[0], row_end=rows[1],
                      backend="cpp")
    assert image.shape == (rows[1] - rows[0], 32, 3)
    torch.testing.assert_close(image, background.expand_as(image), rtol=0, atol=0)
    image.sum().backward()
    for name in PARAMS:
        assert not params[name].grad.any()


def test_backward_is_deterministic_across_runs_and_thread_counts():
    width, height = 96, 80
    scene = projected_splats(3000, width, height, seed=9)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = render(scene, "cpp", width, height, (0, height), torch.zeros(3))
        second = render(scene, "cpp", width, height, (0, height), torch.zeros(3))
        torch.set_num_threads(1)
        single = render(scene, "cpp", width, height, (0, height), torch.zeros(3))
    finally:
        torch.set_num_threads(previous)
    for run in (second, single):
        assert torch.equal(run[0], first[0])
        for name in PARAMS:
            assert torch.equal(run[1][name], first[1][name]), name


def test_background_gradient_matches_torch():
    width, height = 40, 36
    scene = mixed_scene(width, height, seed=6)
    grads = {}
    for backend in ("torch", "cpp"):
        background = torch.tensor([0.2, 0.3, 0.4], requires_grad=True)
        rasterize(**scene, width=width, height=height, background=background, backend=backend).square().sum().backward()
        grads[backend] = background.grad
    torch.testing.assert_close(grads["cpp"], grads["torch"], rtol=1e-4, atol=1e-4)


def test_auto_picks_cpp_on_cpu(caplog):
    with caplog.at_level(logging.INFO, logger="lightning_grendel.splatting.rasterize"):
        assert resolve_backend("auto", torch.device("cpu")) == "cpp"


@pytest.mark.skipif(not gsplat_available(), reason="needs CUDA and gsplat (pip install 'lightning-grendel[cuda]')")
@pytest.mark.parametrize("rows", [(0, 61), (5, 29), (16, 48)])
def test_gsplat_matches_torch_on_cuda(rows):
    """The gsplat mapping (strip shift, per-axis radii, background) against the reference, strips included."""
    assert_parity(mixed_scene(75, 61), 75, 61, rows, backend="gsplat", device="cuda", image_atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_gsplat_without_cuda_is_a_clear_error():
    scene = projected_splats(10, 16, 16)
    with pytest.raises(ValueError, match="gsplat.*CUDA"):
        rasterize(**scene, width=16, height=16, backend="gsplat")

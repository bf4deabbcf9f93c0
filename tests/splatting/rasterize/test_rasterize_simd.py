"""The vectorised float32 kernel against the scalar C++ kernel and the torch reference; its fast exp's bound."""

from __future__ import annotations

import pytest
import torch

from lightning_grendel.splatting.rasterize import cpp_backend
from lightning_grendel.splatting.rasterize.splats import PixelRows, Splats
from lightning_grendel.splatting.rasterize.torch_backend import rasterize_torch
from tests.splatting.rasterize.test_rasterize_cpp import PARAMS, mixed_scene

pytestmark = [
    pytest.mark.skipif(not cpp_backend.cpp_available(), reason="the C++ rasterizer did not build"),
    pytest.mark.timeout(180),
]

BACKGROUND = torch.tensor([0.2, 0.5, 0.9])


def image_and_grads(scene: dict, width: int, height: int, rows: tuple[int, int], kernel) -> tuple:
    """Image and the gradients of a fixed random weighting of it, from ``kernel(splats, rows)``."""
    params = {k: v.detach().clone().requires_grad_(k in PARAMS) for k, v in scene.items()}
    splats = Splats(**params)
    background = torch.linspace(0.2, 0.9, scene["colors"].shape[1], dtype=scene["colors"].dtype)
    image = kernel(splats, PixelRows(width, height, *rows, background))
    weights = torch.randn(image.shape, generator=torch.Generator().manual_seed(5), dtype=image.dtype)
    (image * weights).sum().backward()
    return image.detach(), {k: params[k].grad for k in PARAMS}


def simd(splats, rows):
    return cpp_backend.rasterize_cpp(splats, rows, impl="simd")


def scalar(splats, rows):
    return cpp_backend.rasterize_cpp(splats, rows, impl="scalar")


def assert_close(got: tuple, want: tuple) -> None:
    """The project's parity tolerances: images 1e-5, gradients 1e-4 relative to each gradient's scale."""
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)
    for key in PARAMS:
        scale = want[1][key].abs().max().clamp_min(1e-12)
        torch.testing.assert_close(got[1][key] / scale, want[1][key] / scale, rtol=0, atol=1e-4, msg=key)


@pytest.mark.parametrize(("width", "height", "rows"), [(64, 48, (0, 48)), (37, 29, (0, 29)), (53, 70, (16, 45)),
                                                       (17, 5, (0, 5))], ids=str)
def test_simd_matches_scalar_and_torch_on_widths_that_are_not_multiples_of_16(width, height, rows):
    scene = mixed_scene(width, height, seed=width)
    fast = image_and_grads(scene, width, height, rows, simd)
    assert_close(fast, image_and_grads(scene, width, height, rows, scalar))
    assert_close(fast, image_and_grads(scene, width, height, rows, rasterize_torch))


@pytest.mark.parametrize("channels", [1, 4, 7])
def test_simd_matches_scalar_for_other_channel_counts(channels):
    scene = mixed_scene(40, 33, channels=channels, seed=channels)
    assert_close(image_and_grads(scene, 40, 33, (0, 33), simd), image_and_grads(scene, 40, 33, (0, 33), scalar))


def test_the_default_kernel_is_simd_in_float32_and_scalar_in_float64():
    scene = mixed_scene(32, 32, seed=1)
    for dtype, kernel in ((torch.float32, simd), (torch.float64, scalar)):
        typed = {k: v.to(dtype) if v.is_floating_point() else v for k, v in scene.items()}
        default = image_and_grads(typed, 32, 32, (0, 32), cpp_backend.rasterize_cpp)
        want = image_and_grads(typed, 32, 32, (0, 32), kernel)
        assert default[0].dtype == dtype and torch.equal(default[0], want[0])
        for key in PARAMS:
            assert torch.equal(default[1][key], want[1][key]), key


def test_simd_gradients_are_bit_identical_for_one_and_two_threads():
    scene = mixed_scene(64, 64, seed=4)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = image_and_grads(scene, 64, 64, (0, 64), simd)
        torch.set_num_threads(2)
        two = image_and_grads(scene, 64, 64, (0, 64), simd)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one[0], two[0])
    for key in PARAMS:
        assert torch.equal(one[1][key], two[1][key]), key


def test_fast_exp_is_within_its_stated_bound():
    """simd.h states 2^-22 relative over [-87, 88] (float32 exp's own rounding is 2^-24) and 0 below -87."""
    ext = cpp_backend.load_extension()
    x = torch.cat([torch.linspace(-87.0, 88.0, 200_001), torch.tensor([0.0, -1e-8, 1e-8, -0.5, 0.5])])
    got = ext.fast_exp(x).double()
    want = x.double().exp()
    relative = ((got - want) / want).abs().max().item()
    assert relative <= 2.0**-22, relative
    assert (ext.fast_exp(torch.tensor([-90.0, -200.0])) == 0).all()
    assert ext.simd_isa() in {"avx512", "avx2", "generic"}


def test_bad_impl_and_simd_on_float64_are_clear_errors():
    scene = mixed_scene(16, 16, seed=2)
    splats = Splats(**scene)
    rows = PixelRows(16, 16, 0, 16, BACKGROUND)
    with pytest.raises(ValueError, match="impl must be one of"):
        cpp_backend.rasterize_cpp(splats, rows, impl="avx")
    double = Splats(**{k: v.double() if v.is_floating_point() else v for k, v in scene.items()})
    with pytest.raises(ValueError, match="float32"):
        cpp_backend.rasterize_cpp(double, PixelRows(16, 16, 0, 16, BACKGROUND.double()), impl="simd")


def test_bin_simd_gives_the_forwards_tile_lists():
    """The step benchmark times ``bin_simd`` as the forward's binning: it must do that same work, on strips too."""
    scene = mixed_scene(53, 70, seed=6)
    inputs = cpp_backend.prepare_inputs(Splats(**scene), BACKGROUND)
    means2d, conics, colors, opacities, depths, background, radii = inputs
    ext = cpp_backend.load_extension()
    for rows in ((0, 70), (16, 45)):
        _, _, _, offsets, ids, *_ = ext.forward_simd(means2d, conics, colors, opacities, depths, radii, 53, 70,
                                                     background, *rows)
        binned_offsets, binned_ids = ext.bin_simd(means2d, conics, colors, opacities, depths, radii, 53, 70,
                                                  background, *rows)
        assert ids.numel() > 0
        assert torch.equal(binned_offsets, offsets) and torch.equal(binned_ids, ids)

"""The fused C++ L1 + D-SSIM loss against the torch ``ssim_map`` reference: values, gradients, strips, threads."""

from __future__ import annotations

import pytest
import torch

from lightning_grendel.splatting import fused_ssim
from lightning_grendel.splatting.losses import SSIM_HALO, gaussian_taps, image_loss, ssim_map, strip_loss

pytestmark = [
    pytest.mark.skipif(fused_ssim.load_extension() is None, reason="the fused SSIM extension did not build"),
    pytest.mark.timeout(120),
]


def reference_loss(image, target, own_start, own_end, full_pixels, ssim_weight):
    """The loss written directly with the torch reference ``ssim_map`` (never the fused path)."""
    l1 = (image[own_start:own_end] - target[own_start:own_end]).abs().sum()
    dssim = (1.0 - ssim_map(image, target)[own_start:own_end]).sum()
    return ((1.0 - ssim_weight) * l1 + ssim_weight * dssim) / full_pixels


def images(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=g, dtype=dtype)
    image = (0.7 * target + 0.3 * torch.rand(shape, generator=g, dtype=dtype)).requires_grad_()  # correlated
    return image, target.requires_grad_()


def loss_and_grads(loss_fn, image, target, *args):
    loss = loss_fn(image, target, *args)
    return (loss.detach(), *torch.autograd.grad(loss, (image, target)))


CASES = [((23, 17, 3), (0, 23)), ((23, 17, 3), (4, 9)), ((13, 31, 1), (12, 13)), ((7, 5, 3), (0, 1)),
         ((40, 9, 2), (3, 37)), ((3, 4, 3), (0, 3))]


@pytest.mark.parametrize(("shape", "rows"), CASES, ids=str)
def test_float64_loss_and_gradients_equal_the_torch_reference(shape, rows):
    image, target = images(shape, torch.float64, seed=shape[0])
    args = (*rows, 1.0, 0.2)  # full_pixels = 1: sums, so the 1e-6 bound is absolute on per-pixel terms
    fused = loss_and_grads(strip_loss, image, target, *args)
    assert fused[0].dtype == torch.float64
    reference = loss_and_grads(reference_loss, image, target, *args)
    for got, want in zip(fused, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("shape", "rows"), CASES[:3], ids=str)
def test_float32_matches_the_float64_reference_within_float32_rounding(shape, rows):
    """Both float32 paths (fused and torch) stay within 1e-5 relative / 2e-5 absolute of the float64 truth."""
    image, target = images(shape, torch.float64, seed=shape[1])
    args = (*rows, 1.0, 0.2)
    truth = loss_and_grads(reference_loss, image, target, *args)
    single = [t.detach().float().requires_grad_() for t in (image, target)]
    for loss_fn in (strip_loss, reference_loss):
        got = loss_and_grads(loss_fn, *single, *args)
        torch.testing.assert_close(got[0].double(), truth[0], rtol=1e-5, atol=0)
        for grad, want in zip(got[1:], truth[1:], strict=True):
            torch.testing.assert_close(grad.double(), want, rtol=0, atol=2e-5)


def test_gradcheck_on_a_tiny_strip():
    image, target = images((6, 5, 2), torch.float64, seed=3)
    assert torch.autograd.gradcheck(lambda x, y: strip_loss(x, y, 1, 5, 60, 0.3), (image, target))


def test_strip_with_halo_equals_the_full_image_loss_restricted_to_its_rows():
    full, target = images((29, 13, 3), torch.float64, seed=7)
    pixels = full.numel()
    for own_start, own_end in [(10, 19), (0, 6), (24, 29)]:
        start, end = max(0, own_start - SSIM_HALO), min(29, own_end + SSIM_HALO)
        strip = full.detach()[start:end].clone().requires_grad_()
        strip_target = target.detach()[start:end]
        loss = strip_loss(strip, strip_target, own_start - start, own_end - start, pixels, 0.2)
        (grad,) = torch.autograd.grad(loss, strip)
        whole = loss_and_grads(strip_loss, full, target, own_start, own_end, pixels, 0.2)
        reference = loss_and_grads(reference_loss, full, target, own_start, own_end, pixels, 0.2)
        torch.testing.assert_close(loss.detach(), whole[0], rtol=0, atol=1e-15)
        torch.testing.assert_close(loss.detach(), reference[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, whole[1][start:end], rtol=0, atol=1e-15)
        torch.testing.assert_close(grad, reference[1][start:end], rtol=0, atol=1e-12)
        outside = torch.ones(29, dtype=torch.bool)
        outside[start:end] = False
        assert not whole[1][outside].any(), "rows beyond the halo get no gradient"


def test_results_are_bit_identical_for_one_and_two_threads():
    image, target = images((64, 48, 3), torch.float32, seed=11)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = loss_and_grads(image_loss, image, target)
        torch.set_num_threads(1)
        one = loss_and_grads(image_loss, image, target)
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_loss_without_autograd_and_for_an_empty_strip():
    image, target = images((12, 10, 3), torch.float32, seed=5)
    with torch.no_grad():
        value = image_loss(image, target)
    assert value.grad_fn is None
    torch.testing.assert_close(value, reference_loss(image, target, 0, 12, image.numel(), 0.2).detach())
    empty = strip_loss(image, target, 4, 4, image.numel(), 0.2)
    (grad,) = torch.autograd.grad(empty, image)
    assert empty.item() == 0.0 and not grad.any()


def test_the_cpu_loss_takes_the_fused_path_and_other_dtypes_fall_back_to_torch():
    image, target = images((9, 8, 3), torch.float32, seed=2)
    assert type(image_loss(image, target).grad_fn).__name__.startswith("_FusedStripLossBackward")
    assert not fused_ssim.fused_loss_available(image.half(), target.half())
    assert not fused_ssim.fused_loss_available(image.double(), target)
    half = image_loss(image.detach().bfloat16(), target.detach().bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), image_loss(image, target).detach(), rtol=2e-2, atol=0)


def test_bad_shapes_are_refused_with_a_clear_error():
    image, target = images((9, 8, 3), torch.float64, seed=1)
    with pytest.raises(RuntimeError, match="owned rows"):
        strip_loss(image, target, 3, 12, 10, 0.2)
    ext = fused_ssim.load_extension()
    with pytest.raises(RuntimeError, match="rows, width, channels"):
        ext.loss_and_grad(image.detach()[0], target.detach()[0], gaussian_taps(), 1e-4, 9e-4, 0, 1, 1.0, 1.0,
                          False, False)

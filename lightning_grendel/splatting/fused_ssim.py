"""The C++ fused L1 + D-SSIM loss of a row strip (``csrc/ssim.cpp``), used by ``losses.strip_loss`` on the CPU.

One call computes the loss and, when autograd will need it, the gradient too (two row-parallel passes,
no image-sized convolution intermediates), so backward only scales the saved gradient. The window taps
and SSIM constants come from :mod:`lightning_grendel.splatting.losses`, whose torch ``ssim_map`` stays
the reference; callers fall back to it when the extension cannot be built or the tensors are not on
the CPU (see :func:`fused_loss_available`).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_grendel.splatting.cpp_build import SSIM, load_cpp_extension

_DTYPES = (torch.float32, torch.float64)


def load_extension() -> ModuleType | None:
    """The compiled extension, or ``None`` if it cannot be built (warned about once per process)."""
    return load_cpp_extension(SSIM)


def fused_loss_available(image: Tensor, target: Tensor) -> bool:
    """Whether the fused loss applies: CPU float32/float64 tensors of one dtype and a built extension."""
    on_cpu = image.device.type == "cpu" and target.device.type == "cpu"
    return on_cpu and image.dtype in _DTYPES and image.dtype == target.dtype and load_extension() is not None


class _FusedStripLoss(torch.autograd.Function):
    """Forward returns the loss and keeps the gradients the C++ computed with it; backward scales them."""

    @staticmethod
    def forward(ctx, image, target, taps, constants, rows, scales, needs):
        loss, grad_image, grad_target = load_extension().loss_and_grad(
            image.contiguous(), target.contiguous(), taps, *constants, *rows, *scales, *needs
        )
        ctx.grads = (grad_image, grad_target)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad_image, grad_target = ctx.grads
        scaled = [None if g is None else g * grad_loss for g in (grad_image, grad_target)]
        return scaled[0], scaled[1], None, None, None, None, None


def fused_strip_loss(
    image: Tensor,
    target: Tensor,
    own_rows: tuple[int, int],
    scales: tuple[float, float],
    taps: Tensor,
    constants: tuple[float, float],
) -> Tensor:
    """``l1_scale·Σ|x-y| + ssim_scale·Σ(1-SSIM)`` over rows ``own_rows`` of [rows, W, C] strips.

    Args:
        image: rendered strip, [rows, W, C] (rows may include halo rows around the owned ones).
        target: ground-truth strip of the same shape and dtype.
        own_rows: ``(start, end)`` of the rows whose loss is summed, local to the strip.
        scales: ``(l1_scale, ssim_scale)`` multiplying the two sums.
        taps: the 11 float64 taps of the separable Gaussian window.
        constants: SSIM's ``(C1, C2)``.
    """
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and image.requires_grad, grad_on and target.requires_grad)
    return _FusedStripLoss.apply(image, target, taps, constants, own_rows, scales, needs)

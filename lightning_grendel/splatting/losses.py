"""3DGS photometric loss ``(1-λ)·L1 + λ·(1-SSIM)`` that can be split by pixel rows.

Every term is a sum over pixels divided by the *full* image's pixel count, so the losses of the row
strips rendered on different ranks add up to the single-image loss. SSIM at a pixel depends on the
5 rows around it: a strip rendered with a 5-row halo gives exact values on its own rows. On the CPU
the loss and its gradient come from the fused C++ kernel (:mod:`lightning_grendel.splatting.fused_ssim`);
``ssim_map`` below is the reference it is tested against and the path everywhere else.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_grendel.splatting.fused_ssim import fused_loss_available, fused_strip_loss

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_HALO = SSIM_WINDOW // 2
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


@functools.lru_cache(maxsize=2)
def gaussian_taps(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """The normalised 1D Gaussian [size] in float64; the SSIM window is its outer product with itself."""
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    return kernel / kernel.sum()


@functools.lru_cache(maxsize=8)
def _gaussian_window(size: int, sigma: float, channels: int, dtype: torch.dtype, device: str) -> Tensor:
    kernel = gaussian_taps(size, sigma)
    window = torch.outer(kernel, kernel).to(dtype=dtype, device=device)
    return window.expand(channels, 1, size, size).contiguous()


def ssim_map(image: Tensor, target: Tensor) -> Tensor:
    """Per-pixel SSIM [H, W, C] of two [H, W, C] images (11x11 Gaussian window, zero padding at the edges)."""
    channels = image.shape[-1]
    window = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA, channels, image.dtype, str(image.device))
    x = image.permute(2, 0, 1)[None]
    y = target.permute(2, 0, 1)[None]

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, window, padding=SSIM_HALO, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    value = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    )
    return value[0].permute(1, 2, 0)


def strip_loss(
    image: Tensor, target: Tensor, own_start: int, own_end: int, full_pixels: int, ssim_weight: float = 0.2
) -> Tensor:
    """Loss contribution of rows [own_start, own_end) of a rendered strip (indices local to the strip).

    ``image`` and ``target`` are [rows, W, C] and may include halo rows around the owned ones; the
    result is normalised by ``full_pixels`` = H·W·C of the whole image.
    """
    if ssim_weight > 0 and fused_loss_available(image, target):
        scales = ((1.0 - ssim_weight) / full_pixels, ssim_weight / full_pixels)
        return fused_strip_loss(image, target, (own_start, own_end), scales, gaussian_taps(), (SSIM_C1, SSIM_C2))
    return torch_strip_loss(image, target, own_start, own_end, full_pixels, ssim_weight)


def torch_strip_loss(
    image: Tensor, target: Tensor, own_start: int, own_end: int, full_pixels: int, ssim_weight: float = 0.2
) -> Tensor:
    """:func:`strip_loss` in PyTorch: the path off the CPU or without the C++ extension, and the baseline."""
    own_image, own_target = image[own_start:own_end], target[own_start:own_end]
    loss = (1.0 - ssim_weight) * (own_image - own_target).abs().sum() / full_pixels
    if ssim_weight > 0:
        ssim = ssim_map(image, target)[own_start:own_end]
        loss = loss + ssim_weight * (1.0 - ssim).sum() / full_pixels
    return loss


def image_loss(image: Tensor, target: Tensor, ssim_weight: float = 0.2) -> Tensor:
    """Whole-image loss: the mean-based 3DGS formula."""
    return strip_loss(image, target, 0, image.shape[0], image.numel(), ssim_weight)

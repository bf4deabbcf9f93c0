"""Evaluation metrics for rendered images: PSNR, SSIM, and LPIPS when its backbone weights are available.

LPIPS needs torchvision's ImageNet AlexNet weights, which torchvision downloads on first use. Without
them (an offline machine) LPIPS is skipped with one log line and never faked.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

log = logging.getLogger(__name__)


def psnr(image: Tensor, target: Tensor) -> Tensor:
    """PSNR in dB of [H, W, 3] images in [0, 1]."""
    return peak_signal_noise_ratio(image.clamp(0, 1), target, data_range=1.0)


def ssim(image: Tensor, target: Tensor) -> Tensor:
    """SSIM of [H, W, 3] images in [0, 1] (torchmetrics: 11x11 Gaussian window, sigma 1.5)."""
    return structural_similarity_index_measure(
        image.clamp(0, 1).permute(2, 0, 1)[None], target.permute(2, 0, 1)[None], data_range=1.0
    )


def alexnet_weights_path() -> Path:
    from torchvision.models import AlexNet_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(AlexNet_Weights.IMAGENET1K_V1.url).name


def make_lpips() -> nn.Module | None:
    """An LPIPS (AlexNet) metric module, or None with one log line when the backbone weights are missing."""
    weights = alexnet_weights_path()
    if not weights.is_file():
        log.warning("LPIPS skipped: AlexNet backbone weights not found at %s (needs one online run)", weights)
        return None
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    return LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)


def lpips(metric: nn.Module, image: Tensor, target: Tensor) -> Tensor:
    """LPIPS of [H, W, 3] images in [0, 1] (lower is better)."""
    metric = metric.to(image.device)
    return metric(image.clamp(0, 1).permute(2, 0, 1)[None], target.permute(2, 0, 1)[None])

"""Coarse-to-fine training: render resolution from the images' spectrum, Gaussian growth matched to it.

DashGaussian (Chen et al., CVPR 2025) observes that early in 3DGS training the Gaussians cannot yet
represent the images' high frequencies, so rendering them at full resolution wastes time. Here the
render starts at ``1/factor`` of the full size, the largest integer factor whose band (frequencies up
to ``0.5/factor`` cycles per full-resolution pixel, in x and in y) leaves at most ``energy_tolerance``
of the images' spectral energy (mean removed) outside it. The band then widens linearly with progress
``p`` (images seen over ``full_resolution_images``), from ``1/start`` of the full band to all of it, and
each step renders at the finest integer factor whose band does not exceed that: ``ceil(1 / band)``.
So the factor falls level by level, and the render is full-size from ``p = 1`` on. (Levels by energy
gained instead would leave the coarse levels almost at once: on ``colmap_blocks`` the top octave holds
only 9 % of the energy; the band is what the Gaussians' sizes have to follow.)

A low-resolution step rasterises at intrinsics scaled by ``1/factor`` against the ground truth
area-pooled by ``factor`` (integer factors, so the pooling is exact; rows and columns beyond a multiple
of the factor are cropped, which keeps the principal point since pixel centres sit at ``x + 0.5``).

The growth of the Gaussians follows the pixels rendered: with ``growth_budget`` set, densification may
grow the count to at most ``initial + (growth_budget - initial)·pixel_fraction``, where pixel_fraction
is the rendered pixels over the full image's, so the count reaches ``growth_budget`` only at full size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - torch's convention
from torch import Tensor


@dataclass
class CoarseToFine:
    """Resolution schedule and matched growth budget (see :mod:`~lightning_grendel.splatting.coarse_to_fine`).

    Args:
        full_resolution_images: images seen by which the render is at full resolution (the schedule's end).
        energy_tolerance: most of the images' spectral energy (mean removed) the starting band may leave out.
        max_factor: largest downsampling factor the schedule may start at.
        growth_budget: most Gaussians at full resolution; before, the densification budget rises with the
            rendered pixels from the initial count (None: growth is not scheduled).
        spectrum_views: training views whose spectra are averaged (evenly spaced over the split).
    """

    full_resolution_images: int = 1000
    energy_tolerance: float = 0.1
    max_factor: int = 4
    growth_budget: int | None = None
    spectrum_views: int = 16

    def __post_init__(self) -> None:
        if self.full_resolution_images < 0 or not 0.0 <= self.energy_tolerance < 1.0 or self.max_factor < 1:
            raise ValueError(
                f"CoarseToFine: full_resolution_images must be >= 0, energy_tolerance in [0, 1) and max_factor >= 1, "
                f"got {self.full_resolution_images}, {self.energy_tolerance}, {self.max_factor}")
        if self.growth_budget is not None and self.growth_budget < 1:
            raise ValueError(f"CoarseToFine: growth_budget must be positive, got {self.growth_budget}")
        if self.spectrum_views < 1:
            raise ValueError(f"CoarseToFine: spectrum_views must be at least 1, got {self.spectrum_views}")


torch.serialization.add_safe_globals([CoarseToFine])  # checkpoints keep the module's hyperparameters


def band_energy(images: Tensor, max_factor: int) -> Tensor:
    """``E[s-1]``: the fraction of the images' energy (mean removed, channels summed) at frequencies up to
    ``0.5/s`` cycles per pixel in both x and y, for s = 1..max_factor. ``images`` is [B, H, W, C]."""
    pixels = images.to(torch.float64)
    pixels = pixels - pixels.mean(dim=(1, 2), keepdim=True)
    power = torch.fft.fft2(pixels, dim=(1, 2)).abs().square().sum(dim=(0, 3))  # [H, W]
    height, width = power.shape
    fy = torch.fft.fftfreq(height, dtype=torch.float64).abs()[:, None]
    fx = torch.fft.fftfreq(width, dtype=torch.float64).abs()[None, :]
    reach = torch.maximum(fy.expand(height, width), fx.expand(height, width))  # the band a pixel belongs to
    total = power.sum()
    if total <= 0:  # flat images: every band holds all of (no) energy
        return torch.ones(max_factor, dtype=torch.float64)
    return torch.stack([power[reach <= 0.5 / s + 1e-12].sum() / total for s in range(1, max_factor + 1)])


class ResolutionSchedule:
    """The downsampling factor at each point of training, from :func:`band_energy` of the training images."""

    def __init__(self, energy: Tensor, config: CoarseToFine) -> None:
        self.energy = energy.to(torch.float64)
        self.config = config
        fits = [s for s in range(1, len(self.energy) + 1) if 1.0 - float(self.energy[s - 1]) <= config.energy_tolerance]
        self.start_factor = max(fits)

    def factor(self, images_seen: int) -> int:
        """The finest integer factor whose band is at most the band due at ``images_seen``."""
        end = self.config.full_resolution_images
        progress = 1.0 if end == 0 else min(max(images_seen / end, 0.0), 1.0)
        band = 1.0 / self.start_factor + (1.0 - 1.0 / self.start_factor) * progress  # fraction of the full band
        return min(self.start_factor, math.ceil(1.0 / band - 1e-9))

    def growth_limit(self, initial: int, factor: int, height: int, width: int) -> int | None:
        """Most Gaussians allowed while rendering at ``factor`` (None without a ``growth_budget``)."""
        budget = self.config.growth_budget
        if budget is None:
            return None
        fraction = (height // factor) * (width // factor) / (height * width)
        return int(initial + max(budget - initial, 0) * fraction)


def area_downsample(images: Tensor, factor: int) -> Tensor:
    """[B, H, W, C] images averaged over ``factor`` x ``factor`` blocks (cropped to whole blocks)."""
    if factor == 1:
        return images
    height, width = images.shape[1] // factor, images.shape[2] // factor
    cropped = images[:, : height * factor, : width * factor]
    return F.avg_pool2d(cropped.permute(0, 3, 1, 2), factor).permute(0, 2, 3, 1).contiguous()


def downsampled_batch(batch: dict[str, Tensor], factor: int) -> dict[str, Tensor]:
    """The batch at ``1/factor`` resolution: area-pooled images and intrinsics scaled to match."""
    if factor == 1:
        return batch
    images = batch["image"]
    images = images.full() if hasattr(images, "full") else images  # a streamed batch's RowImages: every row
    intrinsics = batch["intrinsics"].clone()
    intrinsics[..., :2, :] /= factor  # fx, cx and fy, cy: pixel centres at x + 0.5 keep their place
    return {**batch, "image": area_downsample(images, factor), "intrinsics": intrinsics}

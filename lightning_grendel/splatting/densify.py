"""3DGS adaptive density control: clone, split, prune and opacity reset, on one shard of Gaussians.

The same object runs whatever the strategy: each rank densifies its own shard from its own
statistics, which is exactly what Inria's code does on one GPU because the statistics are per Gaussian.
Schedules are counted in images seen, so they keep their meaning at any batch size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_grendel.splatting.gaussians import activated_opacities, activated_scales
from lightning_grendel.splatting.param_surgery import append_rows, replace_values, select_rows
from lightning_grendel.splatting.projection import quaternion_to_rotation

log = logging.getLogger(__name__)


@dataclass
class DensifyConfig:
    """Thresholds and schedule (in images seen) of 3DGS densification; defaults are Inria's.

    Args:
        grad_threshold: a Gaussian is cloned or split when its view-space (NDC) positional gradient norm,
            averaged over the views that saw it since the last densification, reaches this.
        start_images: densify only after this many images have been seen.
        stop_images: no densification, and no opacity reset, after this many images.
        every_images: densify each time the images seen cross a multiple of this (0: never).
        opacity_reset_every_images: cap every opacity at 0.01 each time the images seen cross a multiple of
            this (0: never); pruning of huge Gaussians starts after the first reset.
        prune_opacity: prune Gaussians whose opacity falls below this after densifying.
        dense_fraction: high-gradient Gaussians with a largest scale up to this fraction of the scene extent
            are cloned, larger ones are split.
        prune_scale_fraction: after the first opacity reset, also prune Gaussians with a largest scale above
            this fraction of the scene extent.
        split_copies: how many Gaussians replace a split one (sampled inside it, scales divided by 0.8·copies).
        max_gaussians: most Gaussians this rank may hold; growth beyond it keeps the highest gradients
            (None: no limit).
        memory_budget_bytes: bytes this rank may spend on its Gaussians while training (parameters, gradients,
            two Adam moments and the step's per-Gaussian buffers: :func:`training_bytes_per_gaussian`, 1,104
            bytes at SH degree 3); caps the count like ``max_gaussians`` (None: no limit).
        absgrad: AbsGS (Ye et al. 2024): rank Gaussians by the absolute view-space gradient, the sum over
            pixels of |d loss / d mean2d| per component, instead of the summed signed gradient, whose
            pixels' contributions can cancel; needs a ``torch`` or ``gsplat`` rasterizer (``cpp`` falls back
            to ``torch`` with a warning).
        absgrad_threshold: ``grad_threshold`` used when ``absgrad`` is on (absolute sums are larger;
            8e-4 is gsplat's value for AbsGS).
    """

    grad_threshold: float = 2e-4
    start_images: int = 500
    stop_images: int = 15_000
    every_images: int = 100
    opacity_reset_every_images: int = 3_000
    prune_opacity: float = 0.005
    dense_fraction: float = 0.01
    prune_scale_fraction: float = 0.1
    split_copies: int = 2
    max_gaussians: int | None = None
    memory_budget_bytes: int | None = None
    absgrad: bool = False
    absgrad_threshold: float = 8e-4

    def capacity(self, sh_degree: int = 3) -> int | None:
        """Most Gaussians this rank may hold: ``max_gaussians`` and what ``memory_budget_bytes`` affords
        (:func:`training_bytes_per_gaussian` each), whichever is smaller."""
        limits = [] if self.max_gaussians is None else [self.max_gaussians]
        if self.memory_budget_bytes is not None:
            limits.append(self.memory_budget_bytes // training_bytes_per_gaussian(sh_degree))
        return min(limits) if limits else None


TRAINING_BYTES_OVER_FLOOR = 160  # measured: see training_bytes_per_gaussian


def training_bytes_per_gaussian(sh_degree: int = 3) -> int:
    """Peak memory one Gaussian costs while training on the CPU: the floor (parameter, gradient and two Adam
    moments per fp32 float: 944 bytes at SH degree 3) plus ``TRAINING_BYTES_OVER_FLOOR``, what
    ``benchmarks/gaussian_memory.py`` measured above it at 1M Gaussians, SH degree 3, one view a step
    (1,104 bytes in all; 4M: fewer): densification statistics, the step's per-Gaussian projection outputs
    and their gradients, and freed memory the allocator keeps (docs/results/capture_scale.md)."""
    floats = 3 + 3 + 4 + 1 + 3 * (sh_degree + 1) ** 2
    return 4 * 4 * floats + TRAINING_BYTES_OVER_FLOOR


class Densifier:
    """Accumulates per-Gaussian view-space gradient statistics and applies density control."""

    def __init__(self, config: DensifyConfig | None = None, sh_degree: int = 3) -> None:
        self.config = config or DensifyConfig()
        self.sh_degree = sh_degree
        self.grad_sum = torch.zeros(0)
        self.visible_count = torch.zeros(0)
        self.capacity_reached_logged = False
        self.growth_limit: int | None = None  # a schedule's cap on the count for now (coarse_to_fine.py)

    @property
    def uses_absgrad(self) -> bool:
        """Whether :meth:`accumulate` wants the renderer's absolute gradients instead of ``means2d.grad``."""
        return self.config.absgrad

    def reset_statistics(self, count: int, device: torch.device) -> None:
        self.grad_sum = torch.zeros(count, device=device)
        self.visible_count = torch.zeros(count, device=device)

    def accumulate(self, means2d_grad: Tensor, radii: Tensor, width: int, height: int) -> None:
        """Add each view's NDC-space gradient norm of the 2-D means [C, N, 2] for visible pairs (with
        ``absgrad``, ``means2d_grad`` is the per-component sum of absolute per-pixel gradients)."""
        if self.grad_sum.shape[0] != means2d_grad.shape[1]:
            self.reset_statistics(means2d_grad.shape[1], means2d_grad.device)
        scale = torch.tensor([0.5 * width, 0.5 * height], device=means2d_grad.device, dtype=means2d_grad.dtype)
        norms = (means2d_grad * scale).norm(dim=-1)
        visible = radii > 0
        self.grad_sum += torch.where(visible, norms, torch.zeros_like(norms)).sum(0).to(self.grad_sum)
        self.visible_count += visible.sum(0).to(self.visible_count)

    def is_densify_step(self, images_before: int, images_after: int) -> bool:
        c = self.config
        return is_scheduled_step(images_before, images_after, c.start_images, c.stop_images, c.every_images)

    def is_opacity_reset_step(self, images_before: int, images_after: int) -> bool:
        c = self.config
        in_window = images_after <= c.stop_images
        return in_window and crosses_multiple(images_before, images_after, c.opacity_reset_every_images)

    def densify_and_prune(
        self, params: nn.ParameterDict, optimizer: torch.optim.Optimizer | None, extent: float, prune_large: bool,
        generator: torch.Generator | None = None,
    ) -> dict[str, int]:
        """Clone small and split large high-gradient Gaussians, then prune transparent (and huge) ones."""
        c = self.config
        count = params["means"].shape[0]
        if self.grad_sum.shape[0] != count:
            self.reset_statistics(count, params["means"].device)
        mean_grad = self.grad_sum / self.visible_count.clamp_min(1)
        max_scale = activated_scales(params).detach().max(dim=1).values
        high_grad = mean_grad >= (c.absgrad_threshold if c.absgrad else c.grad_threshold)
        clone = high_grad & (max_scale <= c.dense_fraction * extent)
        split = high_grad & (max_scale > c.dense_fraction * extent)
        clone, split = self._within_capacity(clone, split, mean_grad, count)

        with torch.no_grad():
            cloned = {key: value.detach()[clone] for key, value in params.items()}
            split_rows = self._split_rows(params, split, generator)
        append_rows(params, optimizer, cloned)
        append_rows(params, optimizer, split_rows)

        opacity = activated_opacities(params).detach()
        prune = opacity < c.prune_opacity
        new_count = params["means"].shape[0]
        split_parents = torch.zeros(new_count, dtype=torch.bool, device=prune.device)
        split_parents[:count] = split
        prune |= split_parents
        if prune_large:
            prune |= activated_scales(params).detach().max(dim=1).values > c.prune_scale_fraction * extent
        select_rows(params, optimizer, ~prune)
        self.reset_statistics(params["means"].shape[0], params["means"].device)
        return {"cloned": int(clone.sum()), "split": int(split.sum()), "pruned": int(prune.sum()) - int(split.sum())}

    def step(
        self, params: nn.ParameterDict, optimizer: torch.optim.Optimizer | None, images_before: int,
        images_after: int, extent: float, generator: torch.Generator | None = None,
    ) -> bool:
        """After an optimiser step: densify and prune, reset opacities, as scheduled; True if densified."""
        densified = self.is_densify_step(images_before, images_after)
        if densified:
            prune_large = images_after > self.config.opacity_reset_every_images
            stats = self.densify_and_prune(params, optimizer, extent, prune_large, generator)
            log.debug("densify at %d images: %s", images_after, stats)
        if self.is_opacity_reset_step(images_before, images_after):
            self.reset_opacity(params, optimizer)
        return densified

    def reset_opacity(self, params: nn.ParameterDict, optimizer: torch.optim.Optimizer | None) -> None:
        """Clamp every opacity to at most 0.01 so that floaters must earn their opacity again."""
        capped = torch.minimum(params["opacities"].detach(), torch.logit(torch.tensor(0.01)).to(params["opacities"]))
        replace_values(params, optimizer, "opacities", capped)

    def _within_capacity(self, clone: Tensor, split: Tensor, mean_grad: Tensor, count: int) -> tuple[Tensor, Tensor]:
        """Keep only the highest-gradient candidates that fit under the capacity (a GPU's memory, here)
        and the growth schedule's limit."""
        limits = [cap for cap in (self.config.capacity(self.sh_degree), self.growth_limit) if cap is not None]
        if not limits:
            return clone, split
        limit = min(limits)
        growth = int(clone.sum()) + (self.config.split_copies - 1) * int(split.sum())
        room = limit - count
        if growth <= room:
            return clone, split
        if not self.capacity_reached_logged and limit != self.growth_limit:
            log.warning("Gaussian capacity reached: %d on this rank (limit %d); densification is capped", count, limit)
            self.capacity_reached_logged = True
        candidates = torch.nonzero(clone | split).flatten()
        ranked = candidates[torch.argsort(mean_grad[candidates], descending=True, stable=True)]
        cost = torch.where(split[ranked], self.config.split_copies - 1, 1)
        keep = ranked[torch.cumsum(cost, 0) <= max(room, 0)]
        mask = torch.zeros_like(clone)
        mask[keep] = True
        return clone & mask, split & mask

    def _split_rows(
        self, params: nn.ParameterDict, split: Tensor, generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        copies = self.config.split_copies
        scales = activated_scales(params).detach()[split].repeat(copies, 1)
        rotation = quaternion_to_rotation(params["quats"].detach()[split]).repeat(copies, 1, 1)
        noise = torch.randn(scales.shape, generator=generator, device=scales.device, dtype=scales.dtype) * scales
        rows = {key: value.detach()[split].repeat(copies, *([1] * (value.dim() - 1))) for key, value in params.items()}
        rows["means"] = rows["means"] + (rotation @ noise[..., None])[..., 0]
        rows["scales"] = (scales / (0.8 * copies)).log()
        return rows


# Checkpoints store the module's hyperparameters, this config among them; they load with weights_only=True.
torch.serialization.add_safe_globals([DensifyConfig])


def is_scheduled_step(before: int, after: int, start: int, stop: int, every: int) -> bool:
    """Whether going from ``before`` to ``after`` images lands in (start, stop] and crosses a multiple of ``every``."""
    return start < after <= stop and crosses_multiple(before, after, every)


def crosses_multiple(before: int, after: int, every: int) -> bool:
    """True when a multiple of ``every`` lies in (before, after]: schedules in images at any batch size."""
    return every > 0 and after // every > before // every

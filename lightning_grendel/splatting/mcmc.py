"""3DGS as Markov chain Monte Carlo (Kheradmand et al. 2024): a fixed Gaussian budget instead of densification.

Every ``every_images`` images, Gaussians whose opacity fell to ``min_opacity`` are *relocated*: each
takes the place of a live Gaussian drawn with probability proportional to opacity, and the drawn
Gaussian and its N - 1 new copies share an opacity and scale chosen so that the N stacked copies render
like the original did (:func:`relocated_opacity_and_scale`). Then the population grows by
``growth`` (5%), by the same sampling, until it reaches the budget. After every optimiser step the
means get noise shaped by their covariance and gated by low opacity (the SGLD step of the paper), and
the loss gets L1 penalties on opacity and scale that push unused Gaussians to die and be recycled
(scene-wide means: the module passes its ``gaussian_mean``).

Relocation, growth and noise are local to one shard of Gaussians: under :class:`GrendelStrategy` each
rank relocates within its own shard and grows up to its share of ``cap_max``, so the ranks never talk
for them and the scene-wide total converges to ``cap_max``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_grendel.splatting.densify import Densifier, DensifyConfig, is_scheduled_step
from lightning_grendel.splatting.gaussians import activated_opacities, activated_scales
from lightning_grendel.splatting.param_surgery import append_rows, overwrite_rows
from lightning_grendel.splatting.projection import covariance_3d

log = logging.getLogger(__name__)


@dataclass
class MCMCConfig:
    """MCMC densification (fixed budget, relocation, position noise, regularisers); defaults are gsplat's.

    Args:
        cap_max: most Gaussians in the scene, all ranks together; under GrendelStrategy each rank may hold
            an even share (``cap_max // world_size``, the remainder going to the first ranks).
        start_images: relocation and growth start after this many images seen.
        stop_images: and stop after this many (noise and regularisers continue).
        every_images: images between two relocation-and-growth steps.
        min_opacity: Gaussians at or below this opacity are dead and get relocated.
        growth: fraction the population grows by at each step, until it reaches the budget.
        noise_lr: the position noise is ``noise_lr`` x the current position learning rate x Σ·ε.
        opacity_reg: weight of the mean opacity added to every view's loss.
        scale_reg: weight of the mean (activated) scale added to every view's loss.
        max_copies: copies of one Gaussian the opacity/scale correction accounts for (gsplat: 51).
    """

    cap_max: int = 1_000_000
    start_images: int = 500
    stop_images: int = 25_000
    every_images: int = 100
    min_opacity: float = 0.005
    growth: float = 0.05
    noise_lr: float = 5e5
    opacity_reg: float = 0.01
    scale_reg: float = 0.01
    max_copies: int = 51

    def __post_init__(self) -> None:
        if self.cap_max < 1 or self.max_copies < 1 or self.growth < 0:
            raise ValueError(
                f"MCMCConfig: cap_max and max_copies must be >= 1 and growth >= 0, got cap_max={self.cap_max}, "
                f"max_copies={self.max_copies}, growth={self.growth}"
            )


torch.serialization.add_safe_globals([MCMCConfig])  # checkpoints store it among the hyperparameters


def relocated_opacity_and_scale(opacities: Tensor, scales: Tensor, copies: Tensor) -> tuple[Tensor, Tensor]:
    """Opacity and scale that N = ``copies`` stacked copies need to render like one Gaussian (paper, Eq. 9).

    The opacity solves 1 - (1 - o_new)^N = o_old. The scale keeps the integral of the composite profile
    along an axis: o_old·σ_old = Σ_{i=1..N} Σ_{k=0..i-1} C(i-1, k) (-1)^k o_new^(k+1) σ_new / √(k+1).
    Summing over i first (hockey stick, Σ_{i=k+1..N} C(i-1, k) = C(N, k+1)) leaves one sum over
    m = k + 1, evaluated in float64 because its terms alternate.
    """
    o = opacities.double()
    n = copies.double()
    new_o = 1.0 - (1.0 - o) ** (1.0 / n)
    m = torch.arange(1, int(copies.max()) + 1, dtype=torch.float64, device=o.device)  # [M]
    log_binom = torch.lgamma(n[:, None] + 1) - torch.lgamma(m + 1) - torch.lgamma((n[:, None] - m + 1).clamp_min(1))
    sign = torch.where(m % 2 == 1, 1.0, -1.0)
    terms = sign * torch.exp(log_binom) * new_o[:, None] ** m / m.sqrt()
    denominator = torch.where(m <= n[:, None], terms, torch.zeros_like(terms)).sum(1)
    new_scales = scales.double() * (o / denominator)[:, None]
    return new_o.to(opacities.dtype), new_scales.to(scales.dtype)


def _copies_of(sampled: Tensor, count: int, max_copies: int) -> Tensor:
    """How many Gaussians each sampled source becomes (itself plus every time it was drawn), capped."""
    return (torch.bincount(sampled, minlength=count)[sampled] + 1).clamp_max(max_copies)


class MCMCDensifier:
    """The MCMC counterpart of :class:`~lightning_grendel.splatting.densify.Densifier` (same hooks)."""

    uses_absgrad = False  # no view-space gradient statistics at all

    def __init__(self, config: MCMCConfig, sh_degree: int = 3) -> None:
        self.config = config
        self.sh_degree = sh_degree
        self.capacity = config.cap_max

    def set_shard(self, rank: int, world_size: int) -> None:
        """Hold this rank's share of ``cap_max`` (the shares add up to ``cap_max``)."""
        cap = self.config.cap_max
        self.capacity = cap // world_size + (1 if rank < cap % world_size else 0)
        if self.capacity < 1:
            raise ValueError(f"MCMCConfig.cap_max={cap} leaves rank {rank} of {world_size} no Gaussians")

    def accumulate(self, means2d_grad: Tensor, radii: Tensor, width: int, height: int) -> None:
        """MCMC needs no view-space gradient statistics."""

    def reset_statistics(self, count: int, device: torch.device) -> None:
        """Nothing to reset (see :meth:`accumulate`)."""

    def regularization(self, params: dict[str, Tensor], mean: Callable[[Tensor], Tensor]) -> Tensor:
        """``opacity_reg``·mean opacity + ``scale_reg``·mean scale, per image.

        ``mean`` is the scene-wide mean over every Gaussian: ``GaussianSplattingModule.gaussian_mean``, which
        under GrendelStrategy adds up every shard (a plain ``Tensor.mean`` would average one shard only).
        """
        c = self.config
        return c.opacity_reg * mean(activated_opacities(params)) + c.scale_reg * mean(activated_scales(params))

    def is_refine_step(self, images_before: int, images_after: int) -> bool:
        c = self.config
        return is_scheduled_step(images_before, images_after, c.start_images, c.stop_images, c.every_images)

    def step(
        self, params: nn.ParameterDict, optimizer: torch.optim.Optimizer | None, images_before: int,
        images_after: int, extent: float, generator: torch.Generator | None = None,
    ) -> bool:
        """After an optimiser step: relocate and grow when scheduled, then add noise.

        Returns whether this was a refinement step: a function of the schedule alone, the same on every
        rank, since the caller may start a collective (redistribution) on it.
        """
        refine = self.is_refine_step(images_before, images_after)
        if refine:
            relocated = self.relocate(params, optimizer, generator)
            added = self.grow(params, optimizer, generator)
            log.debug("MCMC at %d images: relocated %d, added %d, now %d Gaussians here", images_after, relocated,
                      added, params["means"].shape[0])
        self.add_noise(params, _learning_rate_of(optimizer, params["means"]), generator)
        return refine

    @torch.no_grad()
    def relocate(
        self, params: nn.ParameterDict, optimizer: torch.optim.Optimizer | None, generator: torch.Generator | None
    ) -> int:
        """Move every dead Gaussian onto a live one drawn by opacity; both get the corrected opacity and scale."""
        opacity = activated_opacities(params).detach()
        dead = opacity <= self.config.min_opacity
        dead_rows, alive_rows = torch.nonzero(dead).flatten(), torch.nonzero(~dead).flatten()
        if len(dead_rows) == 0 or len(alive_rows) == 0:
            return 0
        drawn = torch.multinomial(opacity[alive_rows], len(dead_rows), replacement=True, generator=generator)
        sources = alive_rows[drawn]
        rows = self._corrected_rows(params, sources)
        overwrite_rows(params, optimizer, torch.cat([sources, dead_rows]),
                       {key: torch.cat([value, value]) for key, value in rows.items()})
        return len(dead_rows)

    @torch.no_grad()
    def grow(
        self, params: nn.ParameterDict, optimizer: torch.optim.Optimizer | None, generator: torch.Generator | None
    ) -> int:
        """Add ``growth`` x the count (up to this rank's budget) as copies of Gaussians drawn by opacity."""
        count = params["means"].shape[0]
        target = min(self.capacity, int((1.0 + self.config.growth) * count))
        new = target - count
        if new <= 0 or count == 0:
            return 0
        opacity = activated_opacities(params).detach()
        sources = torch.multinomial(opacity, new, replacement=True, generator=generator)
        rows = self._corrected_rows(params, sources)
        overwrite_rows(params, optimizer, sources, rows)
        append_rows(params, optimizer, rows)  # zero Adam moments
        return new

    def _corrected_rows(self, params: nn.ParameterDict, sources: Tensor) -> dict[str, Tensor]:
        """Copies of rows ``sources`` with the opacity and scale of their final number of copies."""
        rows = {key: value.detach()[sources] for key, value in params.items()}
        copies = _copies_of(sources, params["means"].shape[0], self.config.max_copies)
        opacity, scales = relocated_opacity_and_scale(
            torch.sigmoid(rows["opacities"]), rows["scales"].exp(), copies
        )
        eps = torch.finfo(torch.float32).eps
        rows["opacities"] = torch.logit(opacity.clamp(self.config.min_opacity, 1.0 - eps))
        rows["scales"] = scales.log()
        return rows

    @torch.no_grad()
    def add_noise(self, params: nn.ParameterDict, learning_rate: float, generator: torch.Generator | None) -> None:
        """Means += lr·noise_lr·Σ·ε·gate(1 - o), the gate ≈ 1 only for nearly transparent Gaussians."""
        means = params["means"]
        opacity = activated_opacities(params).detach()
        gate = torch.sigmoid(100.0 * ((1.0 - opacity) - 0.995))
        covariance = covariance_3d(params["quats"].detach(), activated_scales(params).detach())
        epsilon = torch.randn(means.shape, generator=generator, device=means.device, dtype=means.dtype)
        step = epsilon * (gate * learning_rate * self.config.noise_lr)[:, None]
        means.add_((covariance @ step[..., None])[..., 0])


def _learning_rate_of(optimizer: torch.optim.Optimizer | None, param: Tensor) -> float:
    """The current learning rate of ``param``'s group (0 without an optimiser: no noise)."""
    if optimizer is not None:
        for group in optimizer.param_groups:
            if any(p is param for p in group["params"]):
                return float(group["lr"])
    return 0.0


def make_densifier(config: DensifyConfig | MCMCConfig | None, sh_degree: int = 3) -> Densifier | MCMCDensifier:
    """The density control a config asks for: Inria's (DensifyConfig, the default) or MCMC (MCMCConfig)."""
    if isinstance(config, MCMCConfig):
        return MCMCDensifier(config, sh_degree)
    if config is None or isinstance(config, DensifyConfig):
        return Densifier(config, sh_degree)
    raise TypeError(f"densify must be a DensifyConfig or an MCMCConfig, got {type(config).__name__}")


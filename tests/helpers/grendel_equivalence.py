"""The Grendel-equals-one-process case shared by the equivalence tests on one host and on two hosts.

A small random scene, a loss over each rank's own pixel rows, and the check that every rank's rows,
the loss and every gradient equal one process rendering everything (``SingleProcessRenderer``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from lightning_grendel.splatting.gaussians import make_parameters
from lightning_grendel.splatting.grendel.balancer import LoadBalancer
from lightning_grendel.splatting.grendel.renderer import GrendelRenderer
from lightning_grendel.splatting.losses import SSIM_HALO, strip_loss
from lightning_grendel.splatting.render import SingleProcessRenderer
from tests.helpers.scenes import orbit_cameras, random_gaussians

WIDTH, HEIGHT, COUNT = 40, 72, 400
PASSES = 2  # the second pass renders with the balancer's measured costs: a different cut


def scene(views: int) -> tuple[dict[str, torch.Tensor], Any, torch.Tensor]:
    raw = random_gaussians(COUNT, seed=5, sh_degree=1)
    raw["scales"] = raw["scales"] - 0.5
    cameras = orbit_cameras(views, WIDTH, HEIGHT)
    cameras.ids = torch.arange(views)
    targets = torch.rand(views, HEIGHT, WIDTH, 3, generator=torch.Generator().manual_seed(9))
    return raw, cameras, targets


def loss_and_grads(renderer, params, cameras, targets, ssim_weight: float) -> tuple:
    """(loss, own rows per (view, first row), gradient per parameter, gradient of the 2D means)."""
    halo = SSIM_HALO if ssim_weight > 0 else 0
    result = renderer(params, cameras, 1, torch.tensor([0.1, 0.2, 0.3]), halo=halo)
    loss = sum(
        strip_loss(v.image, targets[v.view, v.row_start : v.row_end], v.own_start - v.row_start,
                   v.own_end - v.row_start, HEIGHT * WIDTH * 3, ssim_weight)
        for v in result.views
    )
    loss.backward()
    rows = {(v.view, v.own_start): v.image[v.own_start - v.row_start : v.own_end - v.row_start].detach()
            for v in result.views}
    return loss.detach(), rows, {k: p.grad.clone() for k, p in params.items()}, result.means2d.grad.clone()


def shard(count: int, rank: int, world: int) -> slice:
    per = -(-count // world)
    return slice(rank * per, min(count, (rank + 1) * per))


def grendel_passes(rank: int, world: int, views: int, ssim_weight: float, balance: str,
                   backend: str = "auto") -> list[tuple]:
    """Run on every rank of a gloo group: this rank's :func:`loss_and_grads` for each pass (loss summed)."""
    raw, cameras, targets = scene(views)
    params = make_parameters({k: v[shard(COUNT, rank, world)] for k, v in raw.items()})
    renderer = GrendelRenderer(LoadBalancer(balance), backend=backend)
    outputs = []
    for _ in range(PASSES):
        for p in params.values():
            p.grad = None
        loss, images, grads, means2d_grad = loss_and_grads(renderer, params, cameras, targets, ssim_weight)
        dist.all_reduce(loss)
        outputs.append((loss, images, grads, means2d_grad))
    return outputs


def assert_matches_single_process(per_rank: list[list[tuple]], views: int, ssim_weight: float) -> None:
    """Every pass of every rank equals one process: loss, each own pixel row once, every gradient row."""
    raw, cameras, targets = scene(views)
    params = make_parameters(raw)
    loss, images, grads, means2d_grad = loss_and_grads(SingleProcessRenderer("torch"), params, cameras, targets,
                                                       ssim_weight)
    world = len(per_rank)
    for step in range(PASSES):
        torch.testing.assert_close(per_rank[0][step][0], loss, rtol=1e-5, atol=1e-7)
        covered = torch.zeros(views, HEIGHT, dtype=torch.int64)
        for rank in range(world):
            _, rank_images, rank_grads, rank_means2d_grad = per_rank[rank][step]
            for (view, own_start), image in rank_images.items():
                covered[view, own_start : own_start + image.shape[0]] += 1
                reference = images[(view, 0)][own_start : own_start + image.shape[0]]
                torch.testing.assert_close(image, reference, rtol=1e-5, atol=1e-6)
            rows = shard(COUNT, rank, world)
            for key, grad in rank_grads.items():
                torch.testing.assert_close(grad, grads[key][rows], rtol=1e-5, atol=1e-8, msg=f"grad of {key}")
            torch.testing.assert_close(rank_means2d_grad, means2d_grad[:, rows], rtol=1e-5, atol=1e-8)
        assert (covered == 1).all(), "every pixel row must be rendered by exactly one rank"

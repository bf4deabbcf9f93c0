"""W-rank Grendel rendering equals 1-rank rendering: images, loss and every Gaussian gradient."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_grendel.splatting.gaussians import make_parameters
from lightning_grendel.splatting.grendel.balancer import LoadBalancer
from lightning_grendel.splatting.grendel.renderer import GrendelRenderer
from lightning_grendel.splatting.losses import strip_loss
from lightning_grendel.splatting.render import SingleProcessRenderer
from tests.helpers.distributed import run_distributed
from tests.helpers.grendel_equivalence import HEIGHT, WIDTH, assert_matches_single_process, grendel_passes, shard
from tests.helpers.scenes import orbit_cameras, random_gaussians


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("world", "views", "ssim_weight"),
    [(2, 1, 0.0), (3, 1, 0.2), (2, 4, 0.2), (3, 4, 0.0)],
)
def test_grendel_render_loss_and_gradients_match_single_process(world, views, ssim_weight):
    per_rank = run_distributed(grendel_passes, world, views, ssim_weight, "pairs", timeout_s=120)
    assert_matches_single_process(per_rank, views, ssim_weight)


def _edge_scene(views: int):
    """Gaussians packed in a small cluster: with the camera aimed off to the side, the cluster sits in the
    image's top rows (lower ranks get nothing), and the last view looks away (no Gaussian touches it)."""
    raw = random_gaussians(60, seed=3, sh_degree=0)
    raw["means"] = raw["means"] * 0.15 + torch.tensor([0.0, 0.0, 0.9])
    raw["scales"] = raw["scales"] - 1.0
    cameras = orbit_cameras(views, WIDTH, HEIGHT)
    cameras.world_to_camera[-1, :3, 3] += torch.tensor([0.0, 0.0, -50.0])  # everything behind this camera
    cameras.ids = torch.arange(views)
    targets = torch.rand(views, HEIGHT, WIDTH, 3, generator=torch.Generator().manual_seed(1))
    return raw, cameras, targets


def _edge_distributed(rank: int, world: int, views: int):
    raw, cameras, targets = _edge_scene(views)
    rows = shard(60, rank, world)
    params = make_parameters({k: v[rows] for k, v in raw.items()})
    renderer = GrendelRenderer(LoadBalancer("off"))
    result = loss_and_grads_with(renderer, params, cameras, targets)
    return result, renderer.last_stats["rows_received"]


def loss_and_grads_with(renderer, params, cameras, targets):
    result = renderer(params, cameras, 0, torch.tensor([0.1, 0.2, 0.3]), halo=0)
    loss = sum(
        strip_loss(v.image, targets[v.view, v.row_start : v.row_end], v.own_start - v.row_start,
                   v.own_end - v.row_start, HEIGHT * WIDTH * 3, 0.0)
        for v in result.views
    )
    loss.backward()
    images = {(v.view, v.own_start): v.image.detach() for v in result.views}
    dist.all_reduce(loss)
    return loss.detach(), images, {k: p.grad.clone() for k, p in params.items()}


@pytest.mark.timeout(240)
def test_exchange_with_empty_ranks_and_a_view_nothing_touches():
    views, world = 2, 3
    raw, cameras, targets = _edge_scene(views)
    params = make_parameters(raw)
    single = SingleProcessRenderer("torch")(params, cameras, 0, torch.tensor([0.1, 0.2, 0.3]))
    loss = sum(
        strip_loss(v.image, targets[v.view], 0, HEIGHT, HEIGHT * WIDTH * 3, 0.0) for v in single.views
    )
    loss.backward()
    background = torch.tensor([0.1, 0.2, 0.3]).expand(HEIGHT, WIDTH, 3)
    torch.testing.assert_close(single.views[1].image, background)  # the second view sees nothing
    per_rank = run_distributed(_edge_distributed, world, views, timeout_s=120)
    torch.testing.assert_close(per_rank[0][0][0], loss.detach(), rtol=1e-5, atol=1e-7)
    touched_rows = [r for r in range(HEIGHT) if not torch.allclose(single.views[0].image[r], background[r])]
    assert max(touched_rows) < HEIGHT * 2 // 3, "the cluster must leave the bottom strips empty"
    assert min(received for _, received in per_rank) == 0, "some rank must receive nothing"
    for rank in range(world):
        (_, images, grads), _ = per_rank[rank]
        for (view, own_start), image in images.items():
            reference = single.views[view].image[own_start : own_start + image.shape[0]]
            torch.testing.assert_close(image, reference.detach(), rtol=1e-5, atol=1e-6)
        rows = shard(60, rank, world)
        for key, grad in grads.items():
            torch.testing.assert_close(grad, params[key].grad[rows], rtol=1e-5, atol=1e-8, msg=key)

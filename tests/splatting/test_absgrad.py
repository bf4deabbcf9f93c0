"""absgrad (AbsGS): per-pixel absolute gradients of the 2-D means, against a pixel-by-pixel autograd loop."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from lightning_grendel.splatting.densify import Densifier, DensifyConfig
from lightning_grendel.splatting.gaussians import make_parameters
from lightning_grendel.splatting.grendel.balancer import LoadBalancer
from lightning_grendel.splatting.grendel.renderer import GrendelRenderer
from lightning_grendel.splatting.losses import SSIM_HALO, strip_loss
from lightning_grendel.splatting.rasterize import rasterize
from lightning_grendel.splatting.rasterize.gsplat_backend import gsplat_available
from lightning_grendel.splatting.render import SingleProcessRenderer
from tests.helpers.absgrad_scene import small_gaussian_scene
from tests.helpers.distributed import run_distributed
from tests.helpers.scenes import orbit_cameras, projected_splats

pytestmark = pytest.mark.timeout(120)


def brute_force_absgrad(splats: dict, weights: Tensor, width: int, height: int, rows: tuple[int, int]) -> Tensor:
    """Σ over pixels of |∂(weights[p] · image[p]) / ∂means2d|: one autograd call per pixel."""
    means2d = splats["means2d"].detach().clone().requires_grad_(True)
    inputs = {**splats, "means2d": means2d}
    image = rasterize(**inputs, width=width, height=height, row_start=rows[0], row_end=rows[1], backend="torch")
    total = torch.zeros_like(means2d)
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            (grad,) = torch.autograd.grad((image[y, x] * weights[y, x]).sum(), means2d, retain_graph=True)
            total += grad.abs()
    return total


@pytest.mark.parametrize(("rows", "backend"), [((0, 20), "torch"), ((5, 19), "torch"), ((0, 20), "cpp")])
def test_absgrad_equals_a_per_pixel_autograd_loop(rows, backend, caplog):
    width, height = 24, 20
    splats = {k: v.detach() for k, v in projected_splats(30, width, height, seed=3).items()}
    weights = torch.randn(rows[1] - rows[0], width, 3, generator=torch.Generator().manual_seed(1))
    means2d = splats["means2d"].clone().requires_grad_(True)
    probe = torch.zeros_like(means2d, requires_grad=True)
    with caplog.at_level(logging.WARNING):
        image = rasterize(**{**splats, "means2d": means2d}, width=width, height=height, row_start=rows[0],
                          row_end=rows[1], backend=backend, absgrad_probe=probe)
    (image * weights).sum().backward()
    expected = brute_force_absgrad(splats, weights, width, height, rows)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(probe.grad, expected, rtol=1e-4, atol=1e-6)
    # The signed sum is smaller wherever pixels disagree: that is what AbsGS is about.
    assert (means2d.grad.abs() <= probe.grad + 1e-6).all()
    assert (probe.grad - means2d.grad.abs()).max() > 1e-3
    if backend == "cpp":  # no per-pixel sums in the C++ kernel: the call went to torch, and said so once
        assert "no per-pixel absolute gradients" in caplog.text


@pytest.mark.skipif(not gsplat_available(), reason="needs CUDA and gsplat (pip install 'lightning-grendel[cuda]')")
@pytest.mark.parametrize("rows", [(0, 40), (5, 29)])
def test_gsplat_absgrad_matches_torch_on_cuda(rows):
    width, height = 48, 40
    splats = {k: v.detach() for k, v in projected_splats(60, width, height, seed=5).items()}
    weights = torch.randn(rows[1] - rows[0], width, 3, generator=torch.Generator().manual_seed(2))
    probes = {}
    for backend, device in (("torch", "cpu"), ("gsplat", "cuda")):
        probe = torch.zeros(60, 2, device=device, requires_grad=True)
        moved = {k: v.to(device).requires_grad_(k == "means2d") for k, v in splats.items()}
        image = rasterize(**moved, width=width, height=height, background=torch.zeros(3, device=device),
                          row_start=rows[0], row_end=rows[1], backend=backend, absgrad_probe=probe)
        (image * weights.to(device)).sum().backward()
        probes[backend] = probe.grad.cpu()
    torch.testing.assert_close(probes["gsplat"], probes["torch"], rtol=1e-3, atol=1e-4)


def symmetric_and_shifted_scene() -> tuple[dict, Tensor, object]:
    """Gaussian 0 sits centred on a wider blob of its own colour: its pixels pull its mean every way
    (signed sum ~0, absolute sum large). Gaussian 1's target is itself moved by a few pixels: a small
    but consistent pull. Plain densification ranks 1 first, absgrad ranks 0 first."""
    cameras = orbit_cameras(1, 48, 32)
    ray = torch.linalg.inv(cameras.world_to_camera[0])
    centre, forward, right = ray[:3, 3], ray[:3, 2], ray[:3, 0]
    means = torch.stack([centre + 4.0 * forward - 0.3 * right, centre + 4.0 * forward + 0.3 * right])
    raw = {
        "means": means,
        "scales": torch.tensor([[-2.4] * 3, [-2.7] * 3]),  # 0 is wider, so it has more pixels to sum over
        "quats": torch.tensor([[1.0, 0, 0, 0]] * 2),
        "opacities": torch.full((2,), 2.0),
        "sh0": torch.tensor([[[1.0, -1.0, -1.0]], [[-1.0, 1.0, -1.0]]]),
        "shN": torch.zeros(2, 0, 3),
    }
    target_raw = {k: v.clone() for k, v in raw.items()}
    target_raw["scales"][0] += 0.5  # a wider blob around Gaussian 0
    target_raw["means"][1] += 0.03 * right  # Gaussian 1 a little to the right
    with torch.no_grad():
        target = SingleProcessRenderer("torch").render_full(target_raw, cameras, 0, torch.zeros(3))[0]
    return raw, target, cameras


def densify_choice(absgrad: bool) -> int:
    raw, target, cameras = symmetric_and_shifted_scene()
    params = make_parameters(raw)
    result = SingleProcessRenderer("torch")(params, cameras, 0, torch.zeros(3), absgrad=absgrad)
    (result.views[0].image - target).abs().sum().backward()
    # Only one of them may grow (room for one clone): densification keeps the highest statistic.
    config = DensifyConfig(absgrad=absgrad, grad_threshold=1e-9, absgrad_threshold=1e-9, max_gaussians=3,
                           dense_fraction=1.0, prune_opacity=0.0)
    densifier = Densifier(config, sh_degree=0)
    assert densifier.uses_absgrad == absgrad
    grad = result.absgrad.grad if absgrad else result.means2d.grad
    densifier.accumulate(grad, result.radii, cameras.width, cameras.height)
    before = params["means"].detach().clone()
    stats = densifier.densify_and_prune(params, None, extent=1.0, prune_large=False)
    assert stats["cloned"] == 1 and params["means"].shape[0] == 3
    return int(torch.nonzero((params["means"][2] - before).abs().sum(-1) == 0).flatten()[0])


def test_absgrad_densifies_the_gaussian_whose_pixels_disagree():
    assert densify_choice(absgrad=False) == 1
    assert densify_choice(absgrad=True) == 0


WIDTH, HEIGHT, COUNT = 40, 72, 300


def grendel_scene(views: int):
    return small_gaussian_scene(COUNT, views, WIDTH, HEIGHT, seed=7)


def absgrad_of(renderer, params, cameras, targets) -> tuple[Tensor, Tensor]:
    result = renderer(params, cameras, 1, torch.tensor([0.1, 0.2, 0.3]), halo=SSIM_HALO, absgrad=True)
    loss = sum(strip_loss(v.image, targets[v.view, v.row_start : v.row_end], v.own_start - v.row_start,
                          v.own_end - v.row_start, HEIGHT * WIDTH * 3, 0.2) for v in result.views)
    loss.backward()
    return result.absgrad.grad.clone(), result.means2d.grad.clone()


def _grendel_absgrad(rank: int, world: int, views: int):
    raw, cameras, targets = grendel_scene(views)
    per = -(-COUNT // world)
    rows = slice(rank * per, min(COUNT, (rank + 1) * per))
    params = make_parameters({k: v[rows] for k, v in raw.items()})
    absgrad, means2d_grad = absgrad_of(GrendelRenderer(LoadBalancer("pairs"), backend="torch"), params, cameras,
                                       targets)
    dist.barrier()
    return rows.start, absgrad, means2d_grad


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("world", "views"), [(2, 2), (3, 1)])
def test_grendel_absgrad_sums_every_ranks_pixels_on_the_owner(world, views):
    raw, cameras, targets = grendel_scene(views)
    expected, expected_signed = absgrad_of(SingleProcessRenderer("torch"), make_parameters(raw), cameras, targets)
    assert (expected - expected_signed.abs()).max() > 0  # the scene has pixels that disagree
    per_rank = run_distributed(_grendel_absgrad, world, views, timeout_s=120)
    got = torch.cat([absgrad for _, absgrad, _ in sorted(per_rank, key=lambda item: item[0])], dim=1)
    signed = torch.cat([grad for _, _, grad in sorted(per_rank, key=lambda item: item[0])], dim=1)
    torch.testing.assert_close(signed, expected_signed, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-9)


def one_step_statistics(absgrad: bool, tmp_path) -> Tensor:
    from lightning.pytorch import Trainer, seed_everything

    from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
    from lightning_grendel.splatting.module import GaussianSplattingModule

    seed_everything(0)
    module = GaussianSplattingModule(sh_degree=0, export_ply=False, backend="torch",
                                     densify=DensifyConfig(absgrad=absgrad, start_images=100))
    data = GaussianSplattingDataModule(format="demo", image_width=32, batch_size=1, num_init_points=200)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, data)
    return module.densifier.grad_sum.clone()


def test_the_module_accumulates_absolute_gradients_when_asked(tmp_path):
    plain, absolute = one_step_statistics(False, tmp_path), one_step_statistics(True, tmp_path)
    assert plain.shape == absolute.shape and plain.max() > 0
    assert (absolute >= plain * (1 - 1e-5)).all()  # |Σ g| <= Σ |g| component-wise, so the norm too
    assert (absolute > 1.5 * plain).any()

"""The CUDA paths against the CPU: full render (projection + SH + rasterize), a module's training on one GPU,
and GrendelStrategy on one GPU over NCCL. Skipped without CUDA; ``benchmarks/gpu_check.sh`` runs them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.grendel import GrendelStrategy
from lightning_grendel.splatting.module import GaussianSplattingModule
from lightning_grendel.splatting.rasterize import resolve_backend
from lightning_grendel.splatting.render import SingleProcessRenderer, splat_gaussians
from tests.helpers.scenes import orbit_cameras, random_gaussians

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
HAS_GSPLAT = importlib.util.find_spec("gsplat") is not None
STEPS = 20


def _render_and_grads(
    backend: str, device: str, projection: str = "torch"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Image and raw-parameter gradients (on the CPU) of one random scene rendered on ``device``."""
    raw = random_gaussians(2000, seed=3, sh_degree=3)
    raw["scales"] = raw["scales"] - 0.5
    cameras = orbit_cameras(1, 96, 80)
    cameras = type(cameras)(cameras.world_to_camera.to(device), cameras.intrinsics.to(device), 96, 80)
    params = {k: v.to(device).requires_grad_(True) for k, v in raw.items()}
    background = torch.tensor([0.1, 0.2, 0.3], device=device)
    image = SingleProcessRenderer(backend, projection=projection)(params, cameras, 3, background).views[0].image
    weights = torch.rand(image.shape, generator=torch.Generator().manual_seed(4)).to(device)
    (image * weights).sum().backward()
    return image.detach().cpu(), {k: p.grad.cpu() for k, p in params.items()}


NEEDS_GSPLAT = pytest.mark.skipif(not HAS_GSPLAT, reason="needs gsplat")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("backend", "projection"), [
    ("torch", "torch"),
    pytest.param("gsplat", "torch", marks=NEEDS_GSPLAT),
    pytest.param("torch", "gsplat", marks=NEEDS_GSPLAT),
    pytest.param("gsplat", "gsplat", marks=NEEDS_GSPLAT),
    pytest.param("gsplat", "auto", marks=NEEDS_GSPLAT),
])
def test_full_render_path_on_cuda_matches_the_cpu_reference(backend, projection):
    ref_image, ref_grads = _render_and_grads("torch", "cpu")
    image, grads = _render_and_grads(backend, "cuda", projection)
    assert ref_image.std() > 0.01  # the scene is not blank
    torch.testing.assert_close(image, ref_image, rtol=0, atol=2e-4)
    for name, ref in ref_grads.items():
        scale = ref.abs().max().item()
        torch.testing.assert_close(grads[name], ref, rtol=1e-3, atol=5e-4 * scale, msg=name)


@NEEDS_GSPLAT
@pytest.mark.timeout(120)
@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
def test_gsplat_projection_equals_the_torch_reference_on_every_kept_pair(rasterize_mode):
    raw = random_gaussians(3000, seed=5, sh_degree=3)
    raw["scales"] = raw["scales"] - 0.5
    cameras = orbit_cameras(3, 96, 80)
    cameras = type(cameras)(cameras.world_to_camera.cuda(), cameras.intrinsics.cuda(), 96, 80)
    outputs = {}
    for projection in ("torch", "gsplat"):
        params = {k: v.cuda().requires_grad_(True) for k, v in raw.items()}
        splats = splat_gaussians(params, cameras, 3, rasterize_mode, projection=projection)
        weights = torch.Generator(device="cuda").manual_seed(6)
        loss = sum((t * torch.rand(t.shape, device="cuda", generator=weights)).sum()
                   for t in (splats.means2d, splats.conics, splats.colors, splats.opacities, splats.depths))
        loss.backward()
        outputs[projection] = (splats, {k: p.grad for k, p in params.items()})
    (ref, ref_grads), (fused, fused_grads) = outputs["torch"], outputs["gsplat"]
    kept = (ref.radii > 0) & (fused.radii > 0)
    assert kept.float().mean() > 0.5 and (ref.radii > 0).sum() - kept.sum() < 0.02 * kept.sum()
    for name in ("means2d", "conics", "colors", "opacities", "depths"):
        torch.testing.assert_close(getattr(fused, name)[kept], getattr(ref, name)[kept], rtol=1e-4, atol=1e-4,
                                   msg=name)
    both = kept.all(dim=0)  # Gaussians kept in every view, so their gradients sum the same pairs
    for name, grad in ref_grads.items():
        scale = grad[both].abs().max().item()
        torch.testing.assert_close(fused_grads[name][both], grad[both], rtol=1e-3, atol=1e-4 * scale, msg=name)


class _RecordSteps(Callback):
    """Writes every step's loss, the Gaussians' device and the process-group backend to ``path``
    (a file, since spawned ranks cannot return objects)."""

    def __init__(self, path: Path) -> None:
        self.path, self.losses = path, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def on_train_end(self, trainer, module) -> None:
        dist = torch.distributed
        torch.save({"losses": self.losses, "device": str(module.gaussians["means"].device),
                    "renderer": type(module.renderer).__name__, "count": module.global_gaussian_count(),
                    "pg_backend": dist.get_backend() if dist.is_initialized() else None}, self.path)


def _fit(tmp_path: Path, name: str, accelerator: str, backend: str, strategy=None, steps: int = STEPS) -> dict:
    seed_everything(0)
    module = GaussianSplattingModule(sh_degree=1, backend=backend, export_ply=False)
    data = GaussianSplattingDataModule(format="demo", image_width=64, batch_size=2, num_init_points=2000)
    record = tmp_path / f"{name}.pt"
    trainer = Trainer(accelerator=accelerator, devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, limit_val_batches=0, callbacks=[_RecordSteps(record)],
                      default_root_dir=tmp_path, **({"strategy": strategy} if strategy is not None else {}))
    trainer.fit(module, data)
    return torch.load(record, weights_only=True)


@pytest.mark.timeout(300)
def test_module_trains_on_one_gpu_like_on_the_cpu(tmp_path):
    gpu = _fit(tmp_path, "gpu", "gpu", "auto")
    cpu = _fit(tmp_path, "cpu", "cpu", "torch", steps=1)
    assert gpu["device"].startswith("cuda") and gpu["renderer"] == "SingleProcessRenderer"
    if HAS_GSPLAT:
        assert resolve_backend("auto", torch.device("cuda")) == "gsplat"
    assert gpu["losses"][0] == pytest.approx(cpu["losses"][0], rel=1e-4)  # same Gaussians, same first batch
    assert all(torch.isfinite(torch.tensor(gpu["losses"])))
    assert sum(gpu["losses"][-5:]) < sum(gpu["losses"][:5])  # it learns


@pytest.mark.timeout(300)
def test_grendel_on_one_gpu_over_nccl_matches_the_single_process_run(tmp_path):
    strategy = GrendelStrategy(process_group_backend="nccl", start_method="spawn", timeout_s=120)
    grendel = _fit(tmp_path, "grendel", "gpu", "auto", strategy=strategy, steps=5)
    single = _fit(tmp_path, "single", "gpu", "auto", steps=5)
    assert grendel["renderer"] == "GrendelRenderer" and "cuda:nccl" in grendel["pg_backend"]
    assert grendel["device"].startswith("cuda")
    assert grendel["losses"][0] == pytest.approx(single["losses"][0], rel=1e-4)
    assert grendel["count"] == single["count"]

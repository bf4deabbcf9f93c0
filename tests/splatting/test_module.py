"""GaussianSplattingModule: gradients through the whole render, densification bookkeeping, optimiser
hyperparameters, and the CLI smoke recipe end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from plyfile import PlyData

from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.densify import (
    TRAINING_BYTES_OVER_FLOOR,
    Densifier,
    DensifyConfig,
    training_bytes_per_gaussian,
)
from lightning_grendel.splatting.gaussians import make_parameters
from lightning_grendel.splatting.losses import image_loss
from lightning_grendel.splatting.module import GaussianSplattingModule
from lightning_grendel.splatting.param_surgery import moments_of, select_rows
from lightning_grendel.splatting.render import SingleProcessRenderer
from tests.helpers.paths import REPO_ROOT
from tests.helpers.scenes import orbit_cameras, random_gaussians

REPO = REPO_ROOT


def test_gradcheck_through_projection_sh_and_rasterization():
    raw = random_gaussians(6, seed=2, dtype=torch.float64, sh_degree=1)
    raw["scales"] = raw["scales"] + 1.0  # a few pixels wide: smooth in every parameter
    raw["opacities"] = raw["opacities"].clamp(-1.0, 1.0)
    cameras = orbit_cameras(1, 12, 10, radius=3.0)
    target = torch.rand(10, 12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    background = torch.tensor([0.3, 0.3, 0.3], dtype=torch.float64)
    renderer = SingleProcessRenderer("torch")
    keys = ("means", "scales", "quats", "opacities", "sh0", "shN")

    def render_loss(*tensors):
        params = dict(zip(keys, tensors, strict=True))
        image = renderer(params, cameras, 1, background).views[0].image
        return image_loss(image, target, ssim_weight=0.2)

    inputs = tuple(raw[k].clone().requires_grad_(True) for k in keys)
    assert float(render_loss(*inputs).detach()) > 0
    assert torch.autograd.gradcheck(render_loss, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_densification_keeps_parameters_and_adam_state_aligned():
    # Rows 0-1: small, high gradient -> cloned; 2-3: large, high gradient -> split; 4: low gradient -> kept;
    # 5: transparent -> pruned.
    raw = random_gaussians(6, seed=4, sh_degree=1)
    raw["scales"] = torch.tensor([-5.0, -5.0, 0.0, 0.0, -5.0, -5.0])[:, None].repeat(1, 3)
    raw["opacities"] = torch.tensor([2.0, 2.0, 2.0, 2.0, 2.0, -8.0])
    params = make_parameters(raw)
    optimizer = torch.optim.Adam([{"params": [p], "name": k} for k, p in params.items()], lr=0.01)
    for p in params.values():
        p.grad = torch.randn_like(p)
    optimizer.step()
    before = {k: v.detach().clone() for k, v in params.items()}
    moments_before = moments_of(params, optimizer)

    densifier = Densifier(DensifyConfig(grad_threshold=0.5, dense_fraction=0.01))
    grads = torch.zeros(1, 6, 2)
    grads[0, :4] = 1.0
    densifier.accumulate(grads, torch.ones(1, 6, dtype=torch.int32), 100, 100)
    stats = densifier.densify_and_prune(params, optimizer, extent=10.0, prune_large=False)

    assert stats == {"cloned": 2, "split": 2, "pruned": 1}
    assert params["means"].shape[0] == 3 + 2 + 4
    moments = moments_of(params, optimizer)
    for key, param in params.items():
        group = next(g for g in optimizer.param_groups if g["name"] == key)
        assert group["params"][0] is param
        assert optimizer.state[param]["exp_avg"].shape == param.shape
        survivors = torch.tensor([0, 1, 4])
        torch.testing.assert_close(param.detach()[:3], before[key][survivors], rtol=0, atol=0)
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(moments[key][name][:3], moments_before[key][name][survivors], rtol=0, atol=0)
            assert moments[key][name][3:].abs().sum() == 0  # new Gaussians start with fresh moments
    torch.testing.assert_close(params["means"].detach()[3:5], before["means"][:2], rtol=0, atol=0)
    expected_split_scales = before["scales"][[2, 3, 2, 3]] - torch.log(torch.tensor(1.6))
    torch.testing.assert_close(params["scales"].detach()[5:], expected_split_scales)


class _RecordOptimizer(Callback):
    def on_train_start(self, trainer, pl_module):
        group = {g["name"]: g for g in trainer.optimizers[0].param_groups}
        self.lr = {k: g["lr"] for k, g in group.items()}
        self.betas = group["sh0"]["betas"]
        self.eps = group["sh0"]["eps"]
        self.extent = pl_module.extent
        self.fused = trainer.optimizers[0].defaults["fused"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("mode", "factor"), [("sqrt", 2.0), ("linear", 4.0), ("none", 1.0)])
def test_batch_scaling_sets_adam_hyperparameters(mode, factor, tmp_path):
    record = _RecordOptimizer()
    module = GaussianSplattingModule(sh_degree=0, batch_scaling=mode, export_ply=False)
    data = GaussianSplattingDataModule(format="demo", image_width=32, batch_size=4)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, limit_val_batches=0, callbacks=[record], default_root_dir=tmp_path)
    trainer.fit(module, data)
    expected_betas = (0.9**4, 0.999**4) if mode != "none" else (0.9, 0.999)
    assert record.lr["sh0"] == pytest.approx(2.5e-3 * factor)
    assert record.lr["opacities"] == pytest.approx(0.05 * factor)
    assert record.betas == pytest.approx(expected_betas)
    assert record.eps == pytest.approx(1e-15 / factor)
    assert record.lr["means"] == pytest.approx(1.6e-4 * record.extent * factor)
    assert record.fused  # one fused pass per parameter on the CPU


def test_fused_adam_follows_the_default_adam_through_densification():
    """The module's fused Adam against torch's default one, with rows pruned and reordered mid-run."""
    raw = random_gaussians(40, seed=7, sh_degree=1)
    runs = {}
    for fused in (False, True):
        params = make_parameters({k: v.clone() for k, v in raw.items()})  # steps update the tensors in place
        optimizer = torch.optim.Adam([{"params": [p], "name": k, "lr": 0.01} for k, p in params.items()],
                                     eps=1e-15, fused=fused)
        g = torch.Generator().manual_seed(8)
        for step in range(6):
            for param in params.values():
                param.grad = torch.randn(param.shape, generator=g)
            optimizer.step()
            if step == 2:
                select_rows(params, optimizer, torch.arange(39, 4, -1))  # drop five rows, reverse the rest
        runs[fused] = {k: v.detach() for k, v in params.items()}, moments_of(params, optimizer)
    (params, moments), (fused_params, fused_moments) = runs[False], runs[True]
    for key, value in params.items():
        torch.testing.assert_close(fused_params[key], value, rtol=1e-6, atol=1e-7, msg=key)
        for name, moment in moments[key].items():
            torch.testing.assert_close(fused_moments[key][name], moment, rtol=1e-6, atol=1e-9, msg=f"{key} {name}")


@pytest.mark.timeout(600)
def test_cli_smoke_recipe_writes_events_checkpoint_and_ply(tmp_path):
    console_script = Path(sys.executable).parent / "lightning-grendel"  # the command the README documents
    command = [str(console_script), "fit", "-c", str(REPO / "recipes/smoke/gaussian.yaml")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "smoke" / "version_0"
    assert list(run.glob("events.out.tfevents.*")), "TensorBoard event file"
    assert list((run / "checkpoints").glob("*.ckpt")), "checkpoint"
    assert (run / "config.yaml").is_file()
    ply = PlyData.read(str(run / "point_cloud.ply"))
    names = [p.name for p in ply["vertex"].properties]
    assert len(names) == 3 + 3 + 3 + 9 + 1 + 3 + 4  # sh_degree 1 in the smoke recipe: 3 * 3 f_rest
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]


def test_capacity_caps_densification_to_the_highest_gradients(caplog):
    raw = random_gaussians(10, seed=1, sh_degree=0)
    raw["scales"] = torch.full((10, 3), -6.0)  # all small: every candidate is cloned
    raw["opacities"] = torch.full((10,), 3.0)
    params = make_parameters(raw)
    densifier = Densifier(DensifyConfig(grad_threshold=0.1, max_gaussians=13), sh_degree=0)
    grads = torch.zeros(1, 10, 2)
    grads[0, :, 0] = torch.arange(10, dtype=torch.float32) + 1.0  # gradient grows with the index
    densifier.accumulate(grads, torch.ones(1, 10, dtype=torch.int32), 100, 100)
    with caplog.at_level("WARNING"):
        stats = densifier.densify_and_prune(params, None, extent=10.0, prune_large=False)
        densifier.accumulate(torch.ones(1, 13, 2), torch.ones(1, 13, dtype=torch.int32), 100, 100)
        densifier.densify_and_prune(params, None, extent=10.0, prune_large=False)
    assert stats["cloned"] == 3 and params["means"].shape[0] == 13
    torch.testing.assert_close(params["means"].detach()[10:], raw["means"][[7, 8, 9]])  # the largest gradients
    assert sum("capacity reached" in r.message for r in caplog.records) == 1  # said once


def test_memory_budget_counts_what_a_training_gaussian_holds(tmp_path):
    """The budget's bytes per Gaussian cover every per-Gaussian tensor still held after a training step
    (parameters, gradients, Adam's moments, densification statistics), which is more than the floor of
    parameters + gradients + two moments the budget used to count, and convert to a count exactly."""
    per_gaussian = training_bytes_per_gaussian(3)
    assert per_gaussian == 4 * 4 * (3 + 3 + 4 + 1 + 48) + TRAINING_BYTES_OVER_FLOOR  # 944 + the measured rest
    assert DensifyConfig(memory_budget_bytes=per_gaussian * 1000).capacity(3) == 1000
    assert DensifyConfig(memory_budget_bytes=per_gaussian * 1000 - 1).capacity(3) == 999
    assert DensifyConfig(memory_budget_bytes=per_gaussian * 1000, max_gaussians=10).capacity(3) == 10
    assert DensifyConfig().capacity(3) is None
    module = GaussianSplattingModule(sh_degree=3, sh_degree_interval=0, export_ply=False, backend="torch",
                                     densify=DensifyConfig(start_images=10**9, opacity_reset_every_images=0))
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False,
                      default_root_dir=tmp_path)
    trainer.fit(module, GaussianSplattingDataModule(format="demo", image_width=24, num_init_points=300))
    count = module.gaussians["means"].shape[0]
    optimizer = module.optimizers().optimizer
    held = [p for p in module.gaussians.values()] + [p.grad for p in module.gaussians.values()]
    held += [t for p in module.gaussians.values() for t in optimizer.state[p].values() if t.dim() > 0]
    held += [module.densifier.grad_sum, module.densifier.visible_count]
    assert all(t.shape[0] == count for t in held)
    held_per_gaussian = sum(t.nbytes for t in held) / count
    assert 944 < held_per_gaussian <= per_gaussian


@pytest.mark.timeout(600)
def test_colmap_recipe_trains_on_the_shared_capture(shared_dataset, tmp_path):

    data = shared_dataset("colmap_blocks")
    command = [sys.executable, "-m", "lightning_grendel", "fit", "-c", str(REPO / "recipes/gaussian/colmap.yaml"),
               f"--data.path={data}", "--data.image_width=96", "--trainer.max_steps=3",
               "--trainer.limit_val_batches=1", "--trainer.check_val_every_n_epoch=1", "--trainer.val_check_interval=3",
               "--trainer.enable_progress_bar=false"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    ply = PlyData.read(str(next((tmp_path / "lightning_logs" / "colmap").glob("version_*/point_cloud.ply"))))
    assert ply["vertex"].count >= 13_000  # COLMAP's 13,454 points are the initial Gaussians


def test_a_nan_parameter_stops_training_with_a_clear_error(tmp_path):
    module = GaussianSplattingModule(sh_degree=0, export_ply=False, backend="torch")
    data = GaussianSplattingDataModule(format="demo", image_width=32, batch_size=1, num_init_points=200)

    class _Poison(Callback):
        def on_train_start(self, trainer, pl_module):
            with torch.no_grad():
                pl_module.gaussians["sh0"][0, 0, 0] = float("nan")

    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, limit_val_batches=0, callbacks=[_Poison()], default_root_dir=tmp_path)
    with pytest.raises(FloatingPointError, match="the loss is nan after 0 images"):
        trainer.fit(module, data)


def test_sharded_initialisation_equals_the_rows_of_the_full_one():
    from types import SimpleNamespace

    data = GaussianSplattingDataModule(format="demo", image_width=32, num_init_points=300)

    def initial(shard_indices=None) -> dict[str, torch.Tensor]:
        module = GaussianSplattingModule(sh_degree=1)
        strategy = SimpleNamespace()
        if shard_indices is not None:  # a GaussianShardingStrategy
            strategy = SimpleNamespace(shard_indices=shard_indices, after_density_change=print, gather_gaussians=print)
        module._trainer = SimpleNamespace(datamodule=data, strategy=strategy)
        module.configure_model()
        return {key: value.detach() for key, value in module.gaussians.items()}

    full = initial()
    half = initial(lambda count: slice(count // 2, count))
    for key, value in half.items():
        torch.testing.assert_close(value, full[key][150:], rtol=0, atol=0, msg=key)

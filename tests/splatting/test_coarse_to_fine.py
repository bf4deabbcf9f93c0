"""Coarse-to-fine training: the schedule's picks on images of known spectrum, the low-resolution batch
(area pooling, scaled intrinsics), the growth limit, and fits with every option on and with a trivial
schedule (which must be the default run exactly)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import Callback, Trainer

from lightning_grendel.splatting.cameras import Cameras
from lightning_grendel.splatting.coarse_to_fine import (
    CoarseToFine,
    ResolutionSchedule,
    area_downsample,
    band_energy,
    downsampled_batch,
)
from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.densify import Densifier, DensifyConfig
from lightning_grendel.splatting.gaussians import make_parameters
from lightning_grendel.splatting.mcmc import MCMCConfig
from lightning_grendel.splatting.module import GaussianSplattingModule
from lightning_grendel.splatting.render import splat_gaussians
from tests.helpers.capture_files import write_colmap_capture
from tests.helpers.scenes import orbit_cameras, random_gaussians


def _three_tones() -> torch.Tensor:
    """80x80 images whose energy is 0.6 at 5/80, 0.3 at 16/80 and 0.1 at 36/80 cycles per pixel (along x)."""
    x = torch.arange(80, dtype=torch.float64)
    row = sum(math.sqrt(share) * torch.cos(2 * math.pi * cycles * x / 80)
              for share, cycles in ((0.6, 5), (0.3, 16), (0.1, 36)))
    return row.expand(80, 80)[None, ..., None].expand(2, 80, 80, 3).clone()


def test_band_energy_and_the_schedule_follow_the_spectrum():
    energy = band_energy(_three_tones(), max_factor=4)
    # Bands reach 0.5/s: 0.5, 0.25, 0.167, 0.125; the tones sit at 0.0625, 0.2 and 0.45.
    torch.testing.assert_close(energy, torch.tensor([1.0, 0.9, 0.6, 0.6], dtype=torch.float64))
    schedule = ResolutionSchedule(energy, CoarseToFine(full_resolution_images=100, energy_tolerance=0.45,
                                                       max_factor=4))
    assert schedule.start_factor == 4  # 0.4 of the energy outside 1/4's band is within the tolerance
    # The band due widens from 1/4 to 1 of the full band: 1/4 + 3/4·progress; the factor is ceil(1 / band).
    assert [schedule.factor(i) for i in (0, 10, 12, 33, 34, 99, 100, 500)] == [4, 4, 3, 3, 2, 2, 1, 1]
    tight = ResolutionSchedule(energy, CoarseToFine(energy_tolerance=0.2, max_factor=4))
    assert tight.start_factor == 2 and tight.factor(0) == 2
    assert ResolutionSchedule(energy, CoarseToFine(energy_tolerance=0.05)).start_factor == 1


def test_smooth_images_start_coarse_and_noise_starts_at_full_size():
    smooth = _three_tones()[..., :1].expand(2, 80, 80, 3) * 0 + torch.linspace(0, 1, 80)[:, None, None]
    assert ResolutionSchedule(band_energy(smooth, 4), CoarseToFine(max_factor=4)).start_factor == 4
    noise = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    assert ResolutionSchedule(band_energy(noise, 4), CoarseToFine(max_factor=4)).start_factor == 1


def test_downsampled_ground_truth_is_area_pooling():
    images = torch.rand(2, 23, 31, 3, generator=torch.Generator().manual_seed(1))
    for factor in (1, 2, 3, 4):
        height, width = 23 // factor, 31 // factor
        blocks = images[:, : height * factor, : width * factor].reshape(2, height, factor, width, factor, 3)
        torch.testing.assert_close(area_downsample(images, factor), blocks.mean(dim=(2, 4)))
    divisible = images[:, :20, :30]
    pooled = F.interpolate(divisible.permute(0, 3, 1, 2), size=(10, 15), mode="area").permute(0, 2, 3, 1)
    torch.testing.assert_close(area_downsample(divisible, 2), pooled)


def test_scaled_intrinsics_put_every_splat_where_the_pooled_pixels_are():
    cameras = orbit_cameras(2, 48, 36, radius=3.0)
    batch = {"image": torch.rand(2, 36, 48, 3), "intrinsics": cameras.intrinsics.clone(),
             "world_to_camera": cameras.world_to_camera}
    low = downsampled_batch(batch, 3)
    assert low["image"].shape == (2, 12, 16, 3)
    torch.testing.assert_close(batch["intrinsics"], cameras.intrinsics)  # the batch's own tensor is untouched
    params = random_gaussians(20, seed=4, sh_degree=0)
    full = splat_gaussians(params, cameras, 0, projection="torch")
    coarse = splat_gaussians(params, Cameras(low["world_to_camera"], low["intrinsics"], 16, 12), 0,
                             projection="torch")
    # A point at full-resolution pixel coordinate u lies at u / 3 in the pooled image (centres at x + 0.5).
    torch.testing.assert_close(coarse.means2d, full.means2d / 3, rtol=1e-5, atol=1e-5)


def test_growth_limit_rises_with_the_pixels_and_caps_densification():
    schedule = ResolutionSchedule(torch.ones(4, dtype=torch.float64), CoarseToFine(growth_budget=500, max_factor=4))
    assert schedule.growth_limit(100, 2, 10, 10) == 100 + 400 * 25 // 100
    assert schedule.growth_limit(100, 1, 10, 10) == 500
    assert ResolutionSchedule(torch.ones(2), CoarseToFine()).growth_limit(100, 2, 10, 10) is None
    raw = random_gaussians(10, seed=1, sh_degree=0)
    raw["scales"] = torch.full((10, 3), -5.0)  # small: every candidate is cloned
    params = make_parameters(raw)
    densifier = Densifier(DensifyConfig(grad_threshold=0.0, prune_opacity=0.0), sh_degree=0)
    densifier.reset_statistics(10, torch.device("cpu"))
    densifier.grad_sum += torch.arange(10.0)
    densifier.visible_count += 1
    densifier.growth_limit = 13
    densifier.densify_and_prune(params, None, extent=1.0, prune_large=False)
    assert params["means"].shape[0] == 13
    torch.testing.assert_close(params["means"][10:], raw["means"][7:])  # the three highest gradients


def test_coarse_to_fine_options_are_checked():
    with pytest.raises(ValueError, match="energy_tolerance"):
        CoarseToFine(energy_tolerance=1.0)
    with pytest.raises(ValueError, match="growth_budget"):
        GaussianSplattingModule(densify=MCMCConfig(cap_max=100), coarse_to_fine={"growth_budget": 50})


class _Record(Callback):
    def __init__(self) -> None:
        self.factors: list[float] = []
        self.counts: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.factors.append(float(trainer.callback_metrics.get("train/resolution_factor", 1.0)))
        self.counts.append(float(trainer.callback_metrics["train/gaussians"]))


def _fit(tmp_path, steps: int, **options) -> tuple[GaussianSplattingModule, _Record, Trainer]:
    torch.manual_seed(0)
    densify = DensifyConfig(start_images=2, stop_images=20, every_images=3, opacity_reset_every_images=8)
    module = GaussianSplattingModule(sh_degree=1, sh_degree_interval=5, densify=densify, backend="cpp",
                                     export_ply=False, **options)
    data = GaussianSplattingDataModule(format="demo", image_width=48, batch_size=1, num_init_points=300)
    record = _Record()
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=[record], default_root_dir=tmp_path)
    trainer.fit(module, data)
    return module, record, trainer


@pytest.mark.timeout(600)
def test_a_fit_with_everything_on_stays_finite_and_a_trivial_schedule_is_the_default_run(tmp_path):
    schedule = CoarseToFine(full_resolution_images=10, energy_tolerance=0.5, max_factor=4, growth_budget=330)
    module, record, trainer = _fit(tmp_path, 16, coarse_to_fine=schedule, sparse_adam=True)
    assert module.resolution_schedule.start_factor > 1  # the demo scene is smooth enough to start coarse
    assert record.factors[0] == module.resolution_schedule.start_factor and record.factors[-1] == 1.0
    assert record.factors == sorted(record.factors, reverse=True)
    assert max(record.counts) <= 330
    for key, value in module.gaussians.items():
        assert torch.isfinite(value).all(), key
    trainer.save_checkpoint(tmp_path / "everything.ckpt")
    checkpoint = torch.load(tmp_path / "everything.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["coarse_to_fine"] == schedule
    counts = [state["row_step"] for state in checkpoint["optimizer_states"][0]["state"].values()]
    assert len(counts) == 6 and all(count.shape == (module.gaussians["means"].shape[0],) for count in counts)

    default, _, _ = _fit(tmp_path, 8)
    trivial, record, _ = _fit(tmp_path, 8, coarse_to_fine=CoarseToFine(max_factor=1))
    assert record.factors == [1.0] * 8
    for key, value in default.gaussians.items():
        torch.testing.assert_close(trivial.gaussians[key], value, rtol=0, atol=0, msg=key)


def test_grendel_refuses_the_one_process_options_before_starting_a_rank(tmp_path):
    data = GaussianSplattingDataModule(format="demo", image_width=32, num_init_points=100)
    for flag, value in (("sparse_adam", True), ("coarse_to_fine", CoarseToFine())):
        module = GaussianSplattingModule(sh_degree=0, backend="torch", **{flag: value})
        trainer = Trainer(strategy="grendel_spawn", accelerator="cpu", devices=2, default_root_dir=tmp_path)
        with pytest.raises(ValueError, match=f"--model.{flag} is not supported under GrendelStrategy"):
            trainer.fit(module, data)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("schedule", [None, CoarseToFine(full_resolution_images=4, energy_tolerance=0.99,
                                                          max_factor=2)])
def test_a_streamed_capture_trains_exactly_as_one_held_in_memory(tmp_path, schedule):
    """Six steps over 5 views, into the second epoch: the streamed loader's prefetching must draw the same
    order from the shared generator as a plain one (it once drew an extra permutation at each epoch's end).
    Streamed batches hand the step RowImages (rows read on demand): coarse to fine's spectrum and pooled
    ground truth read them whole, and give what the in-memory images give, bit for bit."""
    write_colmap_capture(tmp_path / "data", "PINHOLE", "40 40 24 18", count=6)
    trained = {}
    for storage in ("memory", "stream"):
        torch.manual_seed(0)
        module = GaussianSplattingModule(sh_degree=0, backend="cpp", export_ply=False, coarse_to_fine=schedule)
        data = GaussianSplattingDataModule(str(tmp_path / "data"), test_every=6, batch_size=1, image_storage=storage,
                                           image_disk_cache=False, num_init_points=100)
        record = _Record()
        trainer = Trainer(accelerator="cpu", devices=1, max_steps=6, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                          callbacks=[record], default_root_dir=tmp_path / storage)
        trainer.fit(module, data)
        assert record.factors[0] == (1.0 if schedule is None else 2.0) and record.factors[-1] == 1.0
        trained[storage] = module.gaussians
    for key, value in trained["memory"].items():
        torch.testing.assert_close(trained["stream"][key], value, rtol=0, atol=0, msg=key)

"""OrbitPreview logs a frame strip and an animated GIF clip of the orbit to TensorBoard (single process)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from lightning import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.gaussians import make_parameters
from lightning_grendel.splatting.module import GaussianSplattingModule
from lightning_grendel.splatting.viewer.camera_paths import orbit_path
from lightning_grendel.splatting.viewer.orbit_preview import OrbitPreview


@pytest.mark.timeout(120)
def test_orbit_preview_logs_strip_and_clip(tmp_path):
    module = GaussianSplattingModule(sh_degree=0, total_images=2, backend="torch", export_ply=False)
    datamodule = GaussianSplattingDataModule(format="demo", image_width=32, num_init_points=200)
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    trainer = Trainer(max_steps=2, accelerator="cpu", logger=logger, callbacks=[OrbitPreview(frames=4, width=16)],
                      enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                      num_sanity_val_steps=0, enable_model_summary=False)
    trainer.fit(module, datamodule)
    events = EventAccumulator(str(logger.log_dir), size_guidance={"images": 0})
    events.Reload()
    strip = events.Images("orbit/strip")[-1]
    assert (strip.width, strip.height) == (4 * 16, 16)
    clip = events.Images("orbit/clip")[-1]
    with Image.open(io.BytesIO(clip.encoded_image_string)) as gif:
        assert gif.format == "GIF" and gif.n_frames == 4 and gif.size == (16, 16)
        first = gif.convert("RGB").getextrema()
    assert any(low != high for low, high in first)  # the scene, not a blank frame


def test_orbit_preview_rejects_bad_arguments():
    with pytest.raises(ValueError, match="frames"):
        OrbitPreview(frames=0)


class _SaveGathered(Callback):
    """Rank 0 saves every Gaussian at the end of training (the gather is a collective: all ranks call it)."""

    def __init__(self, path) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        gathered = pl_module.gathered_gaussians()
        if trainer.is_global_zero:
            torch.save({k: v.detach().cpu() for k, v in gathered.items()}, self.path)


@pytest.mark.timeout(600)
def test_orbit_preview_under_grendel_two_ranks(tmp_path):
    import lightning_grendel  # noqa: F401  (registers the strategy names)
    from lightning_grendel.splatting.grendel import GrendelStrategy

    module = GaussianSplattingModule(sh_degree=0, total_images=2, backend="torch", export_ply=False)
    datamodule = GaussianSplattingDataModule(format="demo", image_width=32, num_init_points=200)
    logger = TensorBoardLogger(tmp_path, name="run", version=0, default_hp_metric=False)
    trainer = Trainer(strategy=GrendelStrategy(start_method="spawn", timeout_s=120), accelerator="cpu", devices=2,
                      max_steps=2, logger=logger,
                      callbacks=[_SaveGathered(tmp_path / "gaussians.pt"), OrbitPreview(frames=3, width=16)],
                      enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                      num_sanity_val_steps=0, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule)
    events = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    assert (events.Images("orbit/strip")[-1].width, events.Images("orbit/strip")[-1].height) == (48, 16)
    with Image.open(io.BytesIO(events.Images("orbit/clip")[-1].encoded_image_string)) as gif:
        assert gif.n_frames == 3
        assert any(low != high for low, high in gif.convert("RGB").getextrema())
    # The collective render equals a single-process render of every Gaussian along the same orbit.
    single = GaussianSplattingModule(sh_degree=0, backend="torch")
    single.gaussians = make_parameters(torch.load(tmp_path / "gaussians.pt", weights_only=True))
    single.background = datamodule.background
    path = orbit_path(datamodule.train_cameras(), 3, 16)
    expected = torch.cat([single.render_views(path[i])[0].clamp(0, 1) for i in range(3)], dim=1)
    with Image.open(io.BytesIO(events.Images("orbit/strip")[-1].encoded_image_string)) as strip:
        logged = torch.from_numpy(np.asarray(strip.convert("RGB"), dtype=np.float32)) / 255.0
    assert (logged - expected).abs().max() < 2.5 / 255

"""OrbitPreview logs a frame strip and an animated GIF clip of the orbit to TensorBoard (single process)."""

from __future__ import annotations

import io

import pytest
from lightning import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.module import GaussianSplattingModule
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

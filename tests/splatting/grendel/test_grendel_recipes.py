"""The Grendel recipes show the trained scene from new viewpoints: OrbitPreview is on in both, and a tiny
``gaussian/grendel_cpu`` fit (two gloo ranks, launched by the CLI) logs the orbit strip and clip."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_grendel.cli import main

ORBIT = "lightning_grendel.splatting.viewer.orbit_preview.OrbitPreview"


@pytest.mark.parametrize("name", ["gaussian/grendel_cpu", "gaussian/grendel_gpu"])
def test_the_grendel_recipes_enable_the_orbit_preview(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", name, "--data.path", "unused", "--print_config"])
    assert exit_info.value.code in (0, None)
    assert f"class_path: {ORBIT}" in capsys.readouterr().out


@pytest.mark.timeout(600)
def test_a_tiny_grendel_cpu_fit_logs_the_orbit(tmp_path, shared_dataset):
    tiny = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.strategy.init_args.timeout_s", "120", "--data.image_width", "32",
            "--data.num_init_points", "500", "--model.total_images", "4", "--model.export_ply", "false"]
    command = [sys.executable, "-m", "lightning_grendel", "fit", "-c", "gaussian/grendel_cpu",
               "--data.path", str(shared_dataset("nerf_synthetic_blocks")), *tiny]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "grendel_cpu" / "version_0"),
                              size_guidance={"images": 0})
    events.Reload()
    strip = events.Images("orbit/strip")[-1]
    assert (strip.width, strip.height) == (8 * 32, 32)  # 8 frames, the recipe's 128 px capped at the data's 32
    with Image.open(io.BytesIO(events.Images("orbit/clip")[-1].encoded_image_string)) as gif:
        assert gif.n_frames == 8
        assert any(low != high for low, high in gif.convert("RGB").getextrema())

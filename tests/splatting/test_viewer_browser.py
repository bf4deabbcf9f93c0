"""The viewer in a real browser: ``lightning-grendel view`` of a trained scene, opened in headless Chromium at
a test camera (same pose and intrinsics), looks like ``lightning-grendel render`` of that view.

Chromium is required, not optional: without it this test fails with the install command (CI installs it
with ``make browser``). ``LIGHTNING_GRENDEL_VIEWER_SCREENSHOT=path.png`` saves browser | render | error.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning import Trainer
from PIL import Image

from lightning_grendel.cli import main
from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.module import GaussianSplattingModule
from lightning_grendel.splatting.viewer.scene_server import camera_url
from lightning_grendel.splatting.viewer.web_scene import web_cameras
from tests.helpers.browser import INSTALL_HINT, chromium_path, psnr, screenshots

DATA = {"format": "demo", "image_width": 128}
STEPS = 100
# The page draws with viser's WebGL splatting (8-bit colours, float16 covariances, splats cut at 2.8 sigma,
# off-screen centres culled), the render with this package's rasterizer: they agree to about 34 dB on this
# view. A camera one test view away scores below 20 dB, so the bound also checks the pose and intrinsics.
MIN_PSNR_DB = 30.0
MAX_PSNR_OTHER_VIEW_DB = 20.0


def _start_viewer(checkpoint: Path) -> tuple[subprocess.Popen, str]:
    """``lightning-grendel view`` in its own process (as a user runs it); returns it and the URL it printed."""
    process = subprocess.Popen([sys.executable, "-m", "lightning_grendel", "view", str(checkpoint), "--port", "0",
                                "--no-cameras"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=Path(__file__).resolve().parents[2])
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    output, end = [], time.monotonic() + 300
    while time.monotonic() < end and process.poll() is None:
        if selector.select(timeout=1.0):
            line = process.stdout.readline()
            output.append(line)
            if line.startswith("viewer: "):
                return process, line.split()[1]
    process.kill()
    raise AssertionError("lightning-grendel view printed no URL:\n" + "".join(output))


@pytest.mark.timeout(600)
def test_browser_shows_what_render_renders(tmp_path):
    if chromium_path() is None:
        pytest.fail(INSTALL_HINT)
    torch.manual_seed(0)
    module = GaussianSplattingModule(sh_degree=0, total_images=STEPS, export_ply=False)  # the page has no SH
    trainer = Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0)
    trainer.fit(module, GaussianSplattingDataModule(**DATA))
    checkpoint = tmp_path / "scene.ckpt"
    trainer.save_checkpoint(checkpoint)
    main(["render", "--ckpt", str(checkpoint), "--out", str(tmp_path / "render"), "--path-frames", "0"])
    renders = sorted((tmp_path / "render" / "test").glob("*.png"))
    reference, other = (np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255 for path in renders[:2])
    test_cameras = GaussianSplattingDataModule(**DATA).scene.test.cameras
    camera = test_cameras[0]
    assert renders[0].name.startswith("0000_") and reference.shape == (camera.height, camera.width, 3)
    intrinsics = camera.intrinsics[0]  # the page's camera is a centred pinhole with square pixels
    assert intrinsics[0, 0] == intrinsics[1, 1] and intrinsics[0, 2] * 2 == camera.width
    assert intrinsics[1, 2] * 2 == camera.height

    process, url = _start_viewer(checkpoint)
    try:
        view, whole, text = screenshots(camera_url(url, web_cameras(camera)[0]), camera.width, camera.height)
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C: the command stops its server and exits
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    assert f"{module.gaussians['means'].shape[0]:,} Gaussians" in text  # the status line
    matched, mismatched = psnr(view, reference), psnr(view, other)
    saved = os.environ.get("LIGHTNING_GRENDEL_VIEWER_SCREENSHOT")
    if saved:
        error = np.clip(np.abs(view - reference) * 4, 0, 1)
        strip = np.concatenate([view, reference, error], axis=1)
        Image.fromarray((strip * 255).round().astype(np.uint8)).save(saved)
        print(f"browser vs render {matched:.2f} dB, vs the next test view {mismatched:.2f} dB; wrote {saved}")
    assert matched >= MIN_PSNR_DB, f"browser vs render of the same view: {matched:.2f} dB"
    assert mismatched <= MAX_PSNR_OTHER_VIEW_DB, f"browser vs another view: {mismatched:.2f} dB"
    assert whole.shape == view.shape and process.returncode == 0

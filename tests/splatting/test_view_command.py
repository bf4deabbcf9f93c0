"""``lightning-grendel view``: serves what the source holds, with its training cameras, on the asked address;
bad input (a taken port, a missing source, a dataset that does not load) is one error naming the flag."""

from __future__ import annotations

import logging
import socket
import urllib.request

import numpy as np
import pytest
import torch
from lightning import Trainer

from lightning_grendel.cli import main
from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.module import GaussianSplattingModule
from lightning_grendel.splatting.ply import save_ply
from lightning_grendel.splatting.viewer import view_command
from lightning_grendel.splatting.viewer.scene_server import FRUSTUMS, SceneServer
from lightning_grendel.splatting.viewer.web_scene import web_cameras

DATA = {"format": "demo", "image_width": 32, "num_init_points": 150}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("view")
    torch.manual_seed(0)
    module = GaussianSplattingModule(sh_degree=1, total_images=2, backend="torch", export_ply=False)
    trainer = Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0)
    trainer.fit(module, GaussianSplattingDataModule(**DATA))
    path = root / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


def served_centers(server: SceneServer) -> np.ndarray:
    """Gaussian centres as the page receives them (viser's buffer: 3 float32 first in each 32-byte row)."""
    buffer = np.asarray(server.splats.buffer)
    scale = server.splats.scale
    return buffer[:, :3].copy().view(np.float32) * scale


def _open(*argv: str) -> SceneServer:
    return view_command.open_viewer(view_command.build_parser().parse_args(list(argv)))


@pytest.mark.timeout(300)
def test_view_serves_the_checkpoint_with_its_training_cameras(checkpoint):
    server = _open(str(checkpoint), "--port", "0")
    try:
        assert server.url.startswith("http://127.0.0.1:") and server.port != 0
        with urllib.request.urlopen(server.url, timeout=30) as response:
            assert response.status == 200 and b"<html" in response.read().lower()
        state = torch.load(checkpoint, weights_only=True)["state_dict"]
        np.testing.assert_array_equal(served_centers(server), state["gaussians.means"].numpy())
        cameras = GaussianSplattingDataModule(**DATA).train_cameras()
        assert len(server._cameras) == len(cameras)
        first = web_cameras(cameras)[0]
        for index, camera in enumerate(web_cameras(cameras)):
            frustum = server._server.scene.get_handle_by_name(f"{FRUSTUMS}/{index:05d}")
            np.testing.assert_allclose(frustum.position, camera.position, atol=1e-6)
            assert frustum.fov == pytest.approx(camera.fov)
        assert tuple(server._server.initial_camera.position) == pytest.approx(tuple(first.position))
    finally:
        server.stop()


@pytest.mark.timeout(300)
def test_view_of_a_ply_without_cameras_and_main_until_ctrl_c(checkpoint, tmp_path, monkeypatch, capsys):
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    ply = tmp_path / "scene.ply"
    save_ply(ply, {key[len("gaussians."):]: value for key, value in state.items() if key.startswith("gaussians.")})
    stopped = []

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    original_stop = SceneServer.stop
    monkeypatch.setattr(view_command.time, "sleep", interrupt)
    monkeypatch.setattr(SceneServer, "stop", lambda self: (stopped.append(self), original_stop(self)))
    main(["view", str(ply), "--port", "0"])
    assert "viewer: http://127.0.0.1:" in capsys.readouterr().out
    (server,) = stopped
    assert server._cameras == []  # a PLY names no dataset
    np.testing.assert_array_equal(served_centers(server), state["gaussians.means"].numpy())


def _error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["view", *argv])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()  # one line, no usage text, no traceback
    assert line.startswith("error: "), line
    return line


@pytest.mark.timeout(300)
def test_view_bad_input_is_one_error_naming_the_flag(checkpoint, tmp_path, capsys, caplog):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert f"--port {port}: already in use on 127.0.0.1" in _error(capsys, str(checkpoint), "--port", str(port))
    assert "--port 70000" in _error(capsys, str(checkpoint), "--port", "70000")
    assert f"{tmp_path / 'absent.ckpt'}: no such file" in _error(capsys, str(tmp_path / "absent.ckpt"))
    assert "--data.path" in _error(capsys, str(checkpoint), "--port", "0", "--data.path", str(tmp_path / "nowhere"))
    # A checkpoint whose dataset moved still opens, without frustums, and says why.
    moved = torch.load(checkpoint, weights_only=True)
    moved["datamodule_hyper_parameters"] = {"path": str(tmp_path / "gone"), "format": "colmap"}
    torch.save(moved, tmp_path / "moved.ckpt")
    with caplog.at_level(logging.WARNING):
        server = _open(str(tmp_path / "moved.ckpt"), "--port", "0")
    server.stop()
    assert server._cameras == [] and "no training cameras" in caplog.text

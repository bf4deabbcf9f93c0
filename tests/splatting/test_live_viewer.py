"""LiveViewer: the page shows the Gaussians being trained at the interval, with step, loss, PSNR and count;
under GrendelStrategy rank 0 alone serves every rank's shard; whatever goes wrong, training goes on."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from lightning import Callback, Trainer

from lightning_grendel.cli import main
from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.module import GaussianSplattingModule
from lightning_grendel.splatting.viewer.live import ENV_SWITCH, LiveViewer
from lightning_grendel.splatting.viewer.scene_server import SceneServer
from lightning_grendel.splatting.viewer.web_scene import salient

DATA = {"format": "demo", "image_width": 32, "num_init_points": 200}


def _served_centers(server: SceneServer) -> np.ndarray:
    return np.asarray(server.splats.buffer)[:, :3].copy().view(np.float32) * server.splats.scale


class Recording(LiveViewer):
    """A LiveViewer that notes each refresh: the step, what the page got, the status line."""

    def __init__(self, record_dir=None, synchronous: bool = True, **kwargs) -> None:
        super().__init__(**{"min_seconds": 0.0, **kwargs})  # refresh steps, not the clock (tested on its own)
        self.record_dir, self.synchronous = record_dir, synchronous
        self.steps: list[int] = []
        self.served: np.ndarray | None = None
        self.history: list[np.ndarray] = []
        self.status = ""
        self.started_server = False

    def _refresh(self, trainer, pl_module) -> None:
        super()._refresh(trainer, pl_module)
        self.steps.append(trainer.global_step)
        if self.synchronous and self._pending is not None:
            self._pending.result()  # no refresh is in flight at the next step: the steps are deterministic
        self.started_server = self.started_server or self.server is not None

    def _show(self, *args) -> None:  # rank 0's worker thread, after the training step
        super()._show(*args)
        if self.server.splats is not None:
            self.served = _served_centers(self.server)
            self.history.append(self.served)
        self.status = self.server._status.content

    def teardown(self, trainer, pl_module, stage) -> None:
        super().teardown(trainer, pl_module, stage)  # waits for the last refresh
        if self.record_dir is not None:  # spawned ranks report through files
            rank = trainer.global_rank
            torch.save(pl_module.gaussians["means"].detach().clone(), self.record_dir / f"shard{rank}.pt")
            if self.served is not None:
                np.save(self.record_dir / f"served{rank}.npy", self.served)
            (self.record_dir / f"rank{rank}.json").write_text(
                json.dumps({"steps": self.steps, "server": self.started_server, "status": self.status}))


def _fit(callback, max_steps: int, **trainer_kwargs):
    torch.manual_seed(0)
    module = GaussianSplattingModule(sh_degree=0, total_images=max_steps, backend="torch", export_ply=False)
    options = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
               "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 0, **trainer_kwargs}
    trainer = Trainer(max_steps=max_steps, callbacks=callback if isinstance(callback, list) else [callback], **options)
    trainer.fit(module, GaussianSplattingDataModule(**DATA))
    if "strategy" not in trainer_kwargs:  # spawned ranks report through files instead
        assert trainer.global_step == max_steps  # training always finishes
    return module


@pytest.mark.timeout(300)
def test_live_view_refreshes_at_the_interval_with_the_training_state(monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "on")
    viewer = Recording(port=0, every_n_steps=2, only_when_watched=False)
    module = _fit(viewer, 5, limit_val_batches=1, val_check_interval=3)
    assert viewer.steps == [0, 2, 4, 5]  # start, every 2 steps, the end
    np.testing.assert_array_equal(viewer.served, module.gaussians["means"].detach().numpy())  # the trained scene
    count = module.gaussians["means"].shape[0]
    assert "**step** 5" in viewer.status and f"**Gaussians** {count:,}" in viewer.status
    assert "**loss** 0." in viewer.status and "dB (val, step 3)" in viewer.status
    assert viewer.server is None  # stopped with the fit


@pytest.mark.timeout(300)
def test_live_view_sends_a_capped_scene_and_every_gaussian_on_demand(monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "on")
    viewer = Recording(port=0, every_n_steps=2, only_when_watched=False, max_splats=50)
    module = _fit(viewer, 3)
    trained = {key: value.detach() for key, value in module.gaussians.items()}
    count = trained["means"].shape[0]
    assert count > 50
    keep = salient(trained["opacities"].numpy(), trained["scales"].numpy(), 50)
    np.testing.assert_array_equal(viewer.served, trained["means"].numpy()[keep])  # the 50 that weigh most
    assert f"**Gaussians** {count:,}" in viewer.status  # the panel counts them all
    # The page's box asks for every Gaussian: the last scene is sent again, whole, and back when unticked.
    server = SceneServer("127.0.0.1", 0, max_splats=50)
    try:
        assert server.set_gaussians(trained) == 50
        assert f"the 50 of {count:,} Gaussians" in server._shown.content
        server._show_all.value = True
        np.testing.assert_array_equal(_served_centers(server), trained["means"].numpy())
        assert server._shown.content == ""
        server._show_all.value = False
        np.testing.assert_array_equal(_served_centers(server), trained["means"].numpy()[keep])
    finally:
        server.stop()
    with pytest.raises(ValueError, match="max_splats"):
        LiveViewer(max_splats=0)


class _HoldFirstRefresh(Callback):
    """Keeps the first refresh in flight until the viewer has seen step 2, then waits for it (training thread)."""

    def __init__(self, viewer: Recording) -> None:
        self.viewer, self.release, self.initial = viewer, threading.Event(), None
        original = viewer._show
        viewer._show = lambda *args: (self.release.wait(60), original(*args))

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = pl_module.gaussians["means"].detach().clone().numpy()

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == 2:
            self.release.set()
            self.viewer._pending.result()


@pytest.mark.timeout(300)
def test_live_view_skips_unwatched_and_in_flight_refreshes(monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "on")
    unwatched = Recording(port=0, every_n_steps=1)
    _fit(unwatched, 3)
    assert unwatched.steps == [0, 3]  # the first and the last scene only: no page was open
    monkeypatch.setattr(SceneServer, "client_count", lambda self: 1)
    watched = Recording(port=0, every_n_steps=1)
    _fit(watched, 3)
    assert watched.steps == [0, 1, 2, 3]
    # A due refresh within min_seconds of the last one is skipped too (rank 0's clock): none for an hour.
    throttled = Recording(port=0, every_n_steps=1, min_seconds=3600)
    _fit(throttled, 3)
    assert throttled.steps == [0, 3]
    # Steps 1 and 2 are due while the first refresh is still being sent: skipped, not queued.
    busy = Recording(port=0, every_n_steps=1, synchronous=False)
    hold = _HoldFirstRefresh(busy)
    _fit([busy, hold], 4)  # at each step's end the hold runs after the viewer
    assert busy.steps == [0, 3, 4] and busy.refreshes == 3
    # Sent after two more steps, the first scene is still the step-0 scene: the worker got a copy.
    np.testing.assert_array_equal(busy.history[0], hold.initial)
    assert not np.array_equal(busy.history[0], busy.history[-1])


@pytest.mark.timeout(300)
def test_live_view_problems_are_warnings_and_training_goes_on(monkeypatch, caplog):
    monkeypatch.setenv(ENV_SWITCH, "on")
    with socket.socket() as listener, caplog.at_level(logging.WARNING):
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def broken(self, params):
            raise RuntimeError("client went away")

        monkeypatch.setattr(SceneServer, "set_gaussians", broken)
        viewer = Recording(port=port, every_n_steps=1, only_when_watched=False)
        _fit(viewer, 3)
    assert f"port {port} is taken; serving on http://127.0.0.1:" in caplog.text
    assert caplog.text.count("refresh failed (RuntimeError: client went away); training goes on") == 1
    assert viewer.steps == [0, 1, 2, 3]

    caplog.clear()
    monkeypatch.setitem(sys.modules, "viser", None)  # not installed
    with caplog.at_level(logging.WARNING):
        missing = Recording(port=0)
        _fit(missing, 1)
    assert "not serving the live view: the viewer needs the viser package" in caplog.text and missing.steps == []

    monkeypatch.setenv(ENV_SWITCH, "off")
    switched_off = Recording(port=0)
    _fit(switched_off, 1)
    assert switched_off.steps == [] and not switched_off.started_server

    monkeypatch.setenv(ENV_SWITCH, "on")
    disabled = Recording(port=0, enabled=False)
    _fit(disabled, 1)
    assert disabled.steps == [] and not disabled.started_server


def test_live_view_rejects_bad_arguments_and_modules():
    with pytest.raises(ValueError, match="every_n_steps"):
        LiveViewer(every_n_steps=0)
    with pytest.raises(ValueError, match="every_seconds"):
        LiveViewer(every_seconds=0)
    with pytest.raises(ValueError, match="min_seconds"):
        LiveViewer(min_seconds=-1)
    with pytest.raises(ValueError, match="port"):
        LiveViewer(port=-1)
    with pytest.raises(TypeError, match="LiveViewer shows a Gaussian module"):
        LiveViewer().setup(None, torch.nn.Linear(1, 1), "fit")


@pytest.mark.timeout(600)
def test_live_view_under_grendel_rank_zero_serves_every_shard(tmp_path, monkeypatch):
    import lightning_grendel  # noqa: F401  (registers the strategy names)
    from lightning_grendel.splatting.grendel import GrendelStrategy

    monkeypatch.setenv(ENV_SWITCH, "on")  # the spawned ranks inherit it
    viewer = Recording(record_dir=tmp_path, port=0, every_n_steps=2, only_when_watched=False)
    _fit(viewer, 3, strategy=GrendelStrategy(start_method="spawn", timeout_s=120), devices=2,
         default_root_dir=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == [0, 2, 3]  # both ranks gathered at the same steps
    assert ranks[0]["server"] and not ranks[1]["server"] and not (tmp_path / "served1.npy").exists()
    shards = [torch.load(tmp_path / f"shard{rank}.pt", weights_only=True) for rank in range(2)]
    assert min(len(shard) for shard in shards) > 0
    np.testing.assert_array_equal(np.load(tmp_path / "served0.npy"), torch.cat(shards).numpy())
    assert f"**Gaussians** {sum(len(s) for s in shards):,}" in ranks[0]["status"]


URL_LINE = "LiveViewer: watch training at http://127.0.0.1:"
RECIPE_FIT = ["fit", "-c", "gaussian/demo", "--trainer.max_steps", "2", "--trainer.check_val_every_n_epoch", "1",
              "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", "--data.image_width", "32"]


@pytest.mark.timeout(600)
def test_a_recipe_fit_serves_on_a_taken_port_and_exits(tmp_path):
    """The recipe's LiveViewer, switched on for this one process, on a port already taken: a warning, one URL
    (another port), and the process exits 0 after training (the server's threads do not keep it alive)."""
    env = {key: value for key, value in os.environ.items() if key != ENV_SWITCH}
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        args = [*RECIPE_FIT, "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.callbacks.port", str(port)]
        result = subprocess.run([sys.executable, "-m", "lightning_grendel", *args], cwd=tmp_path, capture_output=True,
                                text=True, timeout=540, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(URL_LINE) == 1, result.stdout[-3000:]
    assert f"LiveViewer: watch training at http://127.0.0.1:{port}/" not in result.stdout
    assert f"LiveViewer: port {port} is taken; serving on http://127.0.0.1:" in result.stderr
    assert list((tmp_path / "run").rglob("last.ckpt"))  # trained to the end


@pytest.mark.timeout(300)
def test_the_recipe_viewer_is_off_with_enabled_false(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV_SWITCH, "on")
    monkeypatch.chdir(tmp_path)
    main([*RECIPE_FIT, "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.callbacks.enabled", "false"])
    assert URL_LINE not in capsys.readouterr().out
    assert list((tmp_path / "run").rglob("last.ckpt"))

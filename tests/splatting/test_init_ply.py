"""GaussianSplattingModule(init_ply=...): a scene file instead of SfM points, checked against the module that
wrote it; SH degree fitting; errors naming the flag and the file; checkpoints that outlive the file."""

from __future__ import annotations

import argparse
import gzip
import struct

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.formats.common import GaussianFileError
from lightning_grendel.splatting.formats.io import read_gaussians, write_gaussians
from lightning_grendel.splatting.grendel import GrendelStrategy
from lightning_grendel.splatting.mcmc import MCMCConfig
from lightning_grendel.splatting.metrics import psnr
from lightning_grendel.splatting.module import GaussianSplattingModule
from lightning_grendel.splatting.ply import save_ply
from lightning_grendel.splatting.render import SingleProcessRenderer
from lightning_grendel.splatting.viewer.render_command import make_module
from tests.helpers.scenes import random_gaussians

pytestmark = pytest.mark.timeout(300)


def _data() -> GaussianSplattingDataModule:
    return GaussianSplattingDataModule(format="demo", image_width=32, batch_size=1, num_init_points=200)


def _trainer(root, max_steps: int) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=root)


def _started(tmp_path, init_ply, **kwargs) -> tuple[GaussianSplattingModule, GaussianSplattingDataModule]:
    """A module set up by ``fit`` from ``init_ply`` without a training step."""
    module = GaussianSplattingModule(backend="torch", export_ply=False, init_ply=str(init_ply), **kwargs)
    data = _data()
    _trainer(tmp_path, max_steps=0).fit(module, data)
    return module, data


def _render(params: dict, data: GaussianSplattingDataModule, sh_degree: int) -> torch.Tensor:
    renderer = SingleProcessRenderer("torch")
    with torch.no_grad():
        return renderer.render_full(params, data.train_cameras()[:3], sh_degree, data.background)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny scene trained at SH degree 1 (degree 1 active after the first image) and its exported PLY."""
    root = tmp_path_factory.mktemp("trained")
    module = GaussianSplattingModule(sh_degree=1, sh_degree_interval=1, backend="torch", export_ply=True)
    data = _data()
    _trainer(root, max_steps=4).fit(module, data)
    params = {key: value.detach().clone() for key, value in module.gaussians.items()}
    assert module.active_sh_degree == 1 and params["shN"].abs().sum() > 0  # the test sees degree-1 colours
    return params, root / "point_cloud.ply", _render(params, data, 1)


def test_a_ply_from_the_exporter_starts_the_same_scene(trained, tmp_path):
    params, ply, reference = trained
    module, data = _started(tmp_path, ply, sh_degree=1)
    for key, value in module.gaussians.items():
        torch.testing.assert_close(value.detach(), params[key], rtol=0, atol=0, msg=key)
    assert module.active_sh_degree == 1  # the file's degree, not the schedule's 0
    torch.testing.assert_close(module.render_views(data.train_cameras()[:3]), reference, rtol=0, atol=0)


def test_an_spz_starts_the_scene_within_its_quantisation(trained, tmp_path):
    params, _, reference = trained
    spz = tmp_path / "scene.spz"
    write_gaussians(spz, params, "spz")
    module, data = _started(tmp_path, spz, sh_degree=1)
    decoded = read_gaussians(spz)
    for key, value in module.gaussians.items():
        torch.testing.assert_close(value.detach(), decoded[key], rtol=0, atol=0, msg=key)
    render = module.render_views(data.train_cameras()[:3])
    torch.testing.assert_close(render, _render(decoded, data, 1), rtol=0, atol=0)
    assert float(psnr(render, reference)) > 35.0  # SPZ's 8-bit colours and 24-bit positions


def test_a_lower_sh_degree_is_padded_with_zero_bands(tmp_path, caplog):
    raw = random_gaussians(30, seed=3, sh_degree=0)
    save_ply(tmp_path / "deg0.ply", raw)
    module, data = _started(tmp_path, tmp_path / "deg0.ply", sh_degree=2)
    assert module.gaussians["shN"].shape == (30, 8, 3) and module.gaussians["shN"].abs().sum() == 0
    assert module.active_sh_degree == 0
    torch.testing.assert_close(module.render_views(data.train_cameras()[:2]), _render(raw, data, 0)[:2],
                               rtol=0, atol=0)


def test_a_higher_sh_degree_is_refused_naming_both_degrees(tmp_path):
    save_ply(tmp_path / "deg2.ply", random_gaussians(10, seed=1, sh_degree=2))
    with pytest.raises(GaussianFileError, match=r"init_ply=.*deg2\.ply.*SH degree 2.*sh_degree=1"):
        _started(tmp_path, tmp_path / "deg2.ply", sh_degree=1)


def _mesh_ply(path) -> None:
    path.write_bytes(b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\n"
                     b"property float z\nend_header\n0 0 0\n")


def _truncated_spz(path) -> None:
    header = struct.pack("<IIIBBBB", 0x5053474E, 3, 10, 0, 12, 0, 0)
    path.write_bytes(gzip.compress(header + bytes(10 * 20 - 7)))  # 10 degree-0 Gaussians need 10 * 20 bytes


@pytest.mark.parametrize(("name", "write", "message"), [
    ("missing.ply", None, "no such file"),
    ("mesh.ply", _mesh_ply, "not a 3DGS PLY"),
    ("cut.spz", _truncated_spz, "truncated"),
])
def test_bad_files_are_refused_naming_the_flag_and_the_file(tmp_path, name, write, message):
    path = tmp_path / name
    if write is not None:
        write(path)
    with pytest.raises(GaussianFileError, match=rf"init_ply='[^']*{name}'.*{message}"):
        _started(tmp_path, path, sh_degree=0)


def test_more_gaussians_than_the_mcmc_budget_are_refused(tmp_path):
    save_ply(tmp_path / "many.ply", random_gaussians(40, seed=2, sh_degree=0))
    with pytest.raises(ValueError, match=r"init_ply=.*many\.ply.*40 Gaussians.*cap_max=25"):
        _started(tmp_path, tmp_path / "many.ply", sh_degree=0, densify=MCMCConfig(cap_max=25))


def test_a_checkpoint_of_an_init_ply_run_outlives_the_file(tmp_path):
    ply = tmp_path / "start.ply"
    save_ply(ply, random_gaussians(50, seed=5, sh_degree=1))
    module = GaussianSplattingModule(sh_degree=2, sh_degree_interval=1000, backend="torch", export_ply=False,
                                     init_ply=str(ply))
    data = _data()
    _trainer(tmp_path, max_steps=2).fit(module, data)
    trainer = module.trainer
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    trained = {key: value.detach().clone() for key, value in module.gaussians.items()}
    cameras = data.train_cameras()[:2]
    expected = module.render_views(cameras)
    ply.unlink()

    checkpoint = torch.load(tmp_path / "run.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["init_ply"] == str(ply)
    loaded = make_module(argparse.Namespace(ckpt=tmp_path / "run.ckpt", backend=None), checkpoint)  # `render --ckpt`
    assert loaded.active_sh_degree == 1  # the file's degree, from the checkpoint
    for key, value in loaded.gaussians.items():
        torch.testing.assert_close(value.detach(), trained[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(loaded.renderer.render_full(loaded.gaussians, cameras, loaded.active_sh_degree,
                                                           data.background), expected, rtol=0, atol=0)

    resumed = GaussianSplattingModule(sh_degree=2, backend="torch", export_ply=False, init_ply=str(ply))
    _trainer(tmp_path, max_steps=3).fit(resumed, _data(), ckpt_path=tmp_path / "run.ckpt")
    assert resumed.images_seen == 3 and resumed.initial_sh_degree == 1



class _DumpShards(Callback):
    """Saves each rank's Gaussians when the run is set up (after any restore) and when training ends."""

    def __init__(self, folder, tag: str) -> None:
        self.folder, self.tag = folder, tag

    def _dump(self, trainer, module, when: str) -> None:
        local = {key: value.detach().clone() for key, value in module.gaussians.items()}
        torch.save(local, self.folder / f"{self.tag}_{when}{trainer.global_rank}.pt")

    def on_fit_start(self, trainer, module) -> None:
        self._dump(trainer, module, "start")

    def on_train_end(self, trainer, module) -> None:
        self._dump(trainer, module, "end")


def _grendel_fit(folder, tag: str, init_ply, max_steps: int, ckpt_path=None) -> list[dict[str, dict]]:
    module = GaussianSplattingModule(sh_degree=1, backend="torch", export_ply=False, init_ply=str(init_ply))
    trainer = Trainer(strategy=GrendelStrategy(start_method="spawn", timeout_s=120), accelerator="cpu", devices=2,
                      max_steps=max_steps, limit_val_batches=0, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=folder,
                      callbacks=[_DumpShards(folder, tag), ModelCheckpoint(dirpath=folder / "ckpt", save_last=True)])
    trainer.fit(module, _data(), ckpt_path=ckpt_path)
    return [{when: torch.load(folder / f"{tag}_{when}{rank}.pt", weights_only=True) for when in ("start", "end")}
            for rank in range(2)]


def _rows(shards: list[dict[str, dict]], when: str, key: str) -> torch.Tensor:
    return torch.cat([shard[when][key] for shard in shards])


@pytest.mark.timeout(600)
def test_grendel_shards_the_file_like_sfm_points_and_resumes_without_it(tmp_path):
    raw = random_gaussians(25, seed=6, sh_degree=1)
    ply = tmp_path / "scene.ply"
    save_ply(ply, raw)
    first = _grendel_fit(tmp_path, "first", ply, max_steps=1)
    assert [shard["start"]["means"].shape[0] for shard in first] == [13, 12]  # the SfM init's even split
    for key, value in raw.items():  # every row of the file exactly once, in order
        torch.testing.assert_close(_rows(first, "start", key), value, rtol=0, atol=0, msg=key)
    ply.unlink()
    resumed = _grendel_fit(tmp_path, "resumed", ply, max_steps=2, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for key in raw:  # the sharded checkpoint's Gaussians, not the (deleted) file's
        torch.testing.assert_close(_rows(resumed, "start", key), _rows(first, "end", key), rtol=0, atol=0, msg=key)

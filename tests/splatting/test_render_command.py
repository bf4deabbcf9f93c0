"""``lightning-grendel render``: the numbers equal ``test``'s, the outputs are complete, bad input is named."""

from __future__ import annotations

import json

import pytest
import torch
from lightning import Callback, Trainer
from PIL import Image

from lightning_grendel.cli import main
from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.grendel.checkpoint import commit_sharded, write_shard
from lightning_grendel.splatting.module import GaussianSplattingModule
from lightning_grendel.splatting.ply import save_ply
from lightning_grendel.splatting.viewer.camera_paths import look_at_centre, orbit_path
from tests.helpers.scenes import orbit_cameras

DATA = {"format": "demo", "image_width": 32, "num_init_points": 300}


class PerViewMetrics(Callback):
    """What ``test`` computes per view (each test batch is one view)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.rows.append({name: float(value) for name, value in outputs.items()})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("render")
    torch.manual_seed(0)
    hparams = {"sh_degree": 1, "sh_degree_interval": 2, "total_images": 6, "backend": "torch", "export_ply": False}
    module = GaussianSplattingModule(**hparams)
    datamodule = GaussianSplattingDataModule(**DATA)
    trainer = Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0)
    trainer.fit(module, datamodule)
    checkpoint = root / "model.ckpt"
    trainer.save_checkpoint(checkpoint)
    metrics = PerViewMetrics()
    tester = Trainer(accelerator="cpu", logger=False, callbacks=[metrics], enable_progress_bar=False,
                     enable_model_summary=False)
    tester.test(GaussianSplattingModule(**hparams), GaussianSplattingDataModule(**DATA),  # as the CLI builds it
                ckpt_path=str(checkpoint), weights_only=True)
    ply = root / "model.ply"
    save_ply(ply, {k: v.detach() for k, v in module.gaussians.items()})
    return root, checkpoint, ply, metrics.rows


@pytest.mark.timeout(300)
def test_render_metrics_equal_test_and_outputs_are_complete(trained, tmp_path):
    _, checkpoint, _, expected = trained
    out = tmp_path / "out"
    main(["render", "--ckpt", str(checkpoint), "--out", str(out), "--path-frames", "3", "--video-format", "gif"])
    summary = json.loads((out / "metrics.json").read_text())
    assert len(summary["per_view"]) == len(expected) > 0
    for row, reference in zip(summary["per_view"], expected, strict=True):
        assert row["psnr"] == pytest.approx(reference["psnr"], abs=1e-5)
        assert row["ssim"] == pytest.approx(reference["ssim"], abs=1e-6)
        assert Image.open(out / row["file"]).size == (32, 32)
    assert (out / "metrics.csv").read_text().count("\n") == len(expected) + 1
    with Image.open(out / "orbit.gif") as gif:
        assert gif.n_frames == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


@pytest.mark.timeout(300)
def test_render_from_ply_and_mp4(trained, tmp_path):
    _, _, ply, _ = trained
    out = tmp_path / "ply_out"
    main(["render", "--ply", str(ply), "--data.format", "demo", "--data.image_width", "32", "--out", str(out),
          "--path-frames", "2", "--path-width", "16"])
    assert (out / "orbit.mp4").stat().st_size > 0 and json.loads((out / "metrics.json").read_text())["views"] > 0


@pytest.mark.timeout(300)
def test_render_interpolates_through_the_training_cameras(trained, tmp_path, capsys):
    _, checkpoint, _, _ = trained
    out = tmp_path / "out"
    main(["render", "--ckpt", str(checkpoint), "--out", str(out), "--path", "interpolate", "--path-order", "nearest",
          "--path-frames", "4", "--path-width", "16", "--video-format", "gif"])
    with Image.open(out / "interpolate.gif") as gif:
        assert gif.n_frames == 4 and gif.size == (16, 16)
    assert not (out / "orbit.gif").exists()
    with pytest.raises(SystemExit) as info:
        main(["render", "--ckpt", str(checkpoint), "--out", str(tmp_path / "bad"), "--path", "spiral"])
    assert info.value.code == 2 and "--path" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["bad_ply", "other_module", "exists", "unwritable", "no_data", "no_source"])
def test_bad_input_names_the_file_or_flag(trained, tmp_path, capsys, case):
    _, checkpoint, _, _ = trained
    out = tmp_path / "out"
    args = ["render", "--out", str(out), "--path-frames", "0"]
    if case == "bad_ply":
        bad = tmp_path / "points.ply"
        bad.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 1\nproperty float x\nend_header\n"
                        + b"\0" * 4)
        args += ["--ply", str(bad), "--data.format", "demo"]
        needle = "points.ply"
    elif case == "other_module":
        other = tmp_path / "other.ckpt"
        torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, other)
        args += ["--ckpt", str(other)]
        needle = "not a GaussianSplattingModule checkpoint"
    elif case == "exists":
        out.mkdir()
        args += ["--ckpt", str(checkpoint)]
        needle = "--out"
    elif case == "unwritable":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        args = ["render", "--out", str(blocker / "out"), "--ckpt", str(checkpoint), "--path-frames", "0"]
        needle = "--out"
    elif case == "no_data":
        args += ["--ply", str(trained[2])]
        needle = "--data.path"
    else:
        needle = "--ckpt"
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err
    if case != "exists":
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_orbit_circles_the_point_the_cameras_look_at():
    cameras = orbit_cameras(6, 20, 10, radius=4.0)  # looking at the origin from radius 4, height 1.5
    assert torch.allclose(look_at_centre(cameras), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    path = orbit_path(cameras, 8, width=10)
    assert (path.width, path.height) == (10, 5) and len(path) == 8
    assert torch.allclose(path.centers.norm(dim=1), torch.full((8,), (16 + 1.5**2) ** 0.5), atol=1e-4)
    forward = path.world_to_camera[:, 2, :3]  # every frame looks at the centre
    assert torch.allclose(forward, -path.centers / path.centers.norm(dim=1, keepdim=True), atol=1e-5)


@pytest.mark.timeout(300)
def test_render_from_a_grendel_sharded_directory_matches_the_single_file(trained, tmp_path):
    _, checkpoint, _, expected = trained
    full = torch.load(checkpoint, map_location="cpu", weights_only=True)
    directory = tmp_path / "sharded"
    count = full["state_dict"]["gaussians.means"].shape[0]
    part = {key: value for key, value in full.items() if key != "optimizer_states"}
    digests = []  # what two ranks of save_sharded write, done here in one process
    for rank, rows in enumerate((slice(0, count // 3), slice(count // 3, count))):
        state = {k: v[rows] if k.startswith("gaussians.") else v for k, v in full["state_dict"].items()}
        digests.append(write_shard({**part, "state_dict": state}, directory, rank, "test"))
    commit_sharded(part, directory, "test", digests)
    out = tmp_path / "out"
    main(["render", "--ckpt", str(directory), "--out", str(out), "--path-frames", "0"])
    rows = json.loads((out / "metrics.json").read_text())["per_view"]
    assert [r["psnr"] for r in rows] == pytest.approx([r["psnr"] for r in expected], abs=1e-4)

"""``lightning-grendel export``: every format from a checkpoint, a Grendel directory and a file, and bad input.

The checkpoints are built here from known tensors (what ``Trainer.save_checkpoint`` stores under
``state_dict``), so the exported file is compared with those tensors, written by the format's own writer.
"""

from __future__ import annotations

import pytest
import torch
from plyfile import PlyData, PlyElement

from lightning_grendel.cli import main
from lightning_grendel.splatting.formats.io import read_gaussians, write_gaussians
from lightning_grendel.splatting.formats.spz import read_spz_header
from lightning_grendel.splatting.grendel.checkpoint import commit_sharded, write_shard
from lightning_grendel.splatting.ply import load_ply, save_ply
from tests.helpers.scenes import random_gaussians

SUFFIX = {"ply": ".ply", "spz": ".spz", "splat": ".splat", "ply_compressed": ".compressed.ply"}


def checkpoint_of(params: dict[str, torch.Tensor], rasterize_mode: str = "classic") -> dict:
    state = {f"gaussians.{key}": value.clone() for key, value in params.items()}
    state["background"] = torch.ones(3)
    return {"state_dict": state, "hyper_parameters": {"sh_degree": 2, "rasterize_mode": rasterize_mode},
            "epoch": 0, "global_step": 3}


@pytest.fixture(scope="module")
def params():
    return random_gaussians(300, seed=4, sh_degree=2)


@pytest.mark.parametrize("format", list(SUFFIX))
def test_export_from_a_checkpoint_equals_the_format_writer(tmp_path, params, format, capsys):
    ckpt = tmp_path / "last.ckpt"
    torch.save(checkpoint_of(params), ckpt)
    out = tmp_path / f"scene{SUFFIX[format]}"
    main(["export", str(ckpt), "--out", str(out)])
    assert f"wrote {out} ({format}, 300 Gaussians, SH degree 2" in capsys.readouterr().out
    reference = tmp_path / f"reference{SUFFIX[format]}"
    write_gaussians(reference, params, format)
    got, expected = read_gaussians(out), read_gaussians(reference)
    for key in params:
        assert torch.equal(got[key], expected[key]), key
    if format == "ply":
        for key, value in params.items():
            assert torch.equal(got[key], value), key  # lossless
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", out.name, reference.name])


def test_export_from_a_grendel_directory_holds_every_shard(tmp_path, params):
    full = checkpoint_of(params, rasterize_mode="antialiased")
    directory = tmp_path / "sharded"
    digests = []  # what two ranks of save_sharded write, done here in one process
    for rank, rows in enumerate((slice(0, 100), slice(100, 300))):
        state = {k: v[rows] if k.startswith("gaussians.") else v for k, v in full["state_dict"].items()}
        digests.append(write_shard({**full, "state_dict": state}, directory, rank, "test"))
    commit_sharded(full, directory, "test", digests)
    main(["export", str(directory), "--out", str(tmp_path / "all.ply")])
    got = load_ply(tmp_path / "all.ply")
    for key, value in params.items():
        assert torch.equal(got[key], value), key
    main(["export", str(directory), "--out", str(tmp_path / "all.spz"), "--spz-version", "4"])
    header = read_spz_header(tmp_path / "all.spz")
    assert header["version"] == 4 and header["points"] == 300 and header["flags"] & 1  # antialiased training


def test_export_converts_between_files(tmp_path, params):
    save_ply(tmp_path / "in.ply", params)
    main(["export", str(tmp_path / "in.ply"), "--out", str(tmp_path / "a.spz")])
    main(["export", str(tmp_path / "a.spz"), "--out", str(tmp_path / "b.ply")])
    main(["export", str(tmp_path / "b.ply"), "--out", str(tmp_path / "c.bin"), "--format", "spz"])
    assert read_spz_header(tmp_path / "a.spz")["flags"] == 0
    first, again = read_gaussians(tmp_path / "a.spz"), read_gaussians(tmp_path / "c.bin")  # SPZ -> PLY -> SPZ
    for key in ("means", "scales", "opacities", "sh0", "shN"):
        assert torch.equal(first[key], again[key]), key  # already on the format's levels: nothing moves
    a, b = first["quats"], again["quats"]
    assert torch.minimum((a - b).abs().amax(1), (a + b).abs().amax(1)).max() < 3e-3
    main(["export", str(tmp_path / "b.ply"), "--out", str(tmp_path / "a.spz"), "--overwrite", "--format", "spz"])


@pytest.mark.parametrize("case", ["exists", "unwritable", "directory", "mismatch", "no_format", "wrong_layout",
                                  "other_module", "truncated_ckpt", "missing", "not_grendel"])
def test_bad_input_names_the_file_or_flag_and_writes_nothing(tmp_path, params, capsys, case):
    ckpt = tmp_path / "last.ckpt"
    torch.save(checkpoint_of(params), ckpt)
    out = tmp_path / "out.spz"
    source = str(ckpt)
    extra: list[str] = []
    if case == "exists":
        out.write_bytes(b"keep me")
        needle = "--out"
    elif case == "unwritable":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = blocker / "out.spz"
        needle = "--out"
    elif case == "directory":
        out = tmp_path / "folder.spz"
        out.mkdir()
        needle = "is a directory"
    elif case == "mismatch":
        extra = ["--format", "ply"]
        needle = "the name says spz but --format is ply"
    elif case == "no_format":
        out = tmp_path / "out.dat"
        needle = "--format"
    elif case == "wrong_layout":
        mesh = tmp_path / "mesh.ply"
        vertices = torch.zeros(3, 3).numpy().view([("x", "<f4"), ("y", "<f4"), ("z", "<f4")]).ravel()
        PlyData([PlyElement.describe(vertices, "vertex")]).write(str(mesh))
        source, needle = str(mesh), "mesh.ply: not a 3DGS PLY"
    elif case == "other_module":
        torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, ckpt)
        needle = "not a GaussianSplattingModule checkpoint"
    elif case == "truncated_ckpt":
        ckpt.write_bytes(ckpt.read_bytes()[:-200])
        needle = "last.ckpt: truncated or not a checkpoint file"
    elif case == "missing":
        source, needle = str(tmp_path / "nope.ckpt"), "nope.ckpt: no such file"
    else:
        (tmp_path / "run").mkdir()
        source, needle = str(tmp_path / "run"), "not a GrendelStrategy checkpoint"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as info:
        main(["export", source, "--out", str(out), *extra])
    assert info.value.code == 2
    error = capsys.readouterr().err
    assert needle in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary file left
    if case == "exists":
        assert out.read_bytes() == b"keep me"

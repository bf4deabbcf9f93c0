"""Atomic writes: ordinary permissions under the umask, and nothing changed or left behind on failure."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from lightning_grendel._atomic import atomic_write
from lightning_grendel.splatting.gaussians import init_from_points
from lightning_grendel.splatting.ply import save_ply


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_files_get_the_permissions_of_an_ordinary_open(tmp_path, umask_027):
    with open(tmp_path / "plain", "w") as file:
        file.write("x")
    with atomic_write(tmp_path / "atomic", "w") as file:
        file.write("x")
    points = torch.rand(5, 3)
    save_ply(tmp_path / "point_cloud.ply", init_from_points(points, torch.rand(5, 3), 0))
    expected = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert expected == 0o640
    assert stat.S_IMODE((tmp_path / "atomic").stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "point_cloud.ply").stat().st_mode) == expected


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_write(target, "w") as file:
        file.write("half of the new")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]

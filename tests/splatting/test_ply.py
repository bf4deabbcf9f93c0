"""PLY export/import: exact round trip, the standard 62-property layout, and clear errors on bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from lightning_grendel.splatting.ply import load_ply, save_ply

STANDARD_62 = (
    ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    + [f"f_rest_{i}" for i in range(45)]
    + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
)


def random_params(n: int, degree: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = (degree + 1) ** 2
    return {
        "means": torch.randn(n, 3, generator=g) * 10,
        "scales": torch.randn(n, 3, generator=g) - 4,
        "quats": torch.randn(n, 4, generator=g),
        "opacities": torch.randn(n, generator=g) * 3,
        "sh0": torch.randn(n, 1, 3, generator=g),
        "shN": torch.randn(n, k - 1, 3, generator=g) * 0.1,
    }


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_round_trip_is_exact(tmp_path, degree):
    params = random_params(57, degree)
    path = tmp_path / "out" / "point_cloud.ply"
    save_ply(path, params)
    loaded = load_ply(path)
    assert set(loaded) == set(params)
    for key, value in params.items():
        assert loaded[key].dtype == torch.float32
        assert loaded[key].shape == value.shape, key
        assert torch.equal(loaded[key], value), key
    assert [p.name for p in tmp_path.joinpath("out").iterdir()] == ["point_cloud.ply"], "temporary file left"


def test_degree3_layout_is_the_standard_62_floats(tmp_path):
    params = random_params(5, 3)
    path = tmp_path / "g.ply"
    save_ply(path, params)
    raw = path.read_bytes()
    assert b"format binary_little_endian 1.0" in raw[:200]
    ply = PlyData.read(str(path))
    vertex = ply["vertex"]
    assert [p.name for p in vertex.properties] == STANDARD_62
    assert all(vertex.data.dtype[name] == np.dtype("<f4") for name in STANDARD_62)
    # Independent reading of the channel-major f_rest order and the other columns.
    i = 3
    sh_n = params["shN"][i]  # [15, 3]
    assert vertex["f_rest_0"][i] == sh_n[0, 0]  # red, basis 1
    assert vertex["f_rest_14"][i] == sh_n[14, 0]  # red, basis 15
    assert vertex["f_rest_15"][i] == sh_n[0, 1]  # green, basis 1
    assert vertex["f_rest_44"][i] == sh_n[14, 2]  # blue, basis 15
    assert vertex["f_dc_2"][i] == params["sh0"][i, 0, 2]
    assert vertex["opacity"][i] == params["opacities"][i]
    assert vertex["rot_0"][i] == params["quats"][i, 0]
    assert vertex["scale_2"][i] == params["scales"][i, 2]
    assert vertex["nx"][i] == 0 and vertex["ny"][i] == 0 and vertex["nz"][i] == 0
    # Header, then exactly N * 62 float32 values.
    assert len(raw) - raw.index(b"end_header\n") - len(b"end_header\n") == 5 * 62 * 4


def test_reads_files_without_normals(tmp_path):
    names = [n for n in STANDARD_62 if n not in ("nx", "ny", "nz")]
    data = np.zeros(3, dtype=[(n, "<f4") for n in names])
    data["x"] = [1.0, 2.0, 3.0]
    data["f_rest_15"] = [0.5, 0.25, 0.125]
    path = tmp_path / "gsplat_style.ply"
    PlyData([PlyElement.describe(data, "vertex")]).write(str(path))
    loaded = load_ply(path)
    assert loaded["means"][:, 0].tolist() == [1.0, 2.0, 3.0]
    assert loaded["shN"].shape == (3, 15, 3)
    assert loaded["shN"][:, 0, 1].tolist() == [0.5, 0.25, 0.125]


def test_missing_properties_name_file_and_properties(tmp_path):
    names = [n for n in STANDARD_62 if n not in ("opacity", "rot_3")]
    data = np.zeros(2, dtype=[(n, "<f4") for n in names])
    path = tmp_path / "broken.ply"
    PlyData([PlyElement.describe(data, "vertex")]).write(str(path))
    with pytest.raises(ValueError) as info:
        load_ply(path)
    message = str(info.value)
    assert "broken.ply" in message and "opacity" in message and "rot_3" in message


def test_garbage_file_names_the_file(tmp_path):
    path = tmp_path / "garbage.ply"
    path.write_bytes(b"not a ply at all")
    with pytest.raises(ValueError, match="garbage.ply"):
        load_ply(path)


def test_save_rejects_wrong_shapes(tmp_path):
    params = random_params(4, 3)
    params["quats"] = params["quats"][:, :3]
    with pytest.raises(ValueError, match="quats"):
        save_ply(tmp_path / "x.ply", params)
    assert not list(tmp_path.iterdir())

"""Gaussian file formats: round trips within each format's stated quantisation, interoperability with an
independent implementation (PlayCanvas's splat-transform, fixtures in tests/data/formats), bad input.

Tolerances are derived from each format's quantisation step (docs/3dgs.md, "Exporting"), not fitted:
a step of s read back at the nearest level is off by at most s / 2.
"""

from __future__ import annotations

import gzip
import math
import struct

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement
from scipy.spatial import cKDTree

from lightning_grendel.splatting.formats.common import GaussianFileError
from lightning_grendel.splatting.formats.compressed_ply import CHUNK, morton_order, write_compressed_ply
from lightning_grendel.splatting.formats.io import read_gaussians, write_gaussians
from lightning_grendel.splatting.formats.splat import importance_order, write_splat
from lightning_grendel.splatting.formats.spz import read_spz_header, write_spz
from lightning_grendel.splatting.ply import load_ply
from lightning_grendel.splatting.sh import SH_C0
from tests.helpers.paths import REPO_ROOT

FIXTURES = REPO_ROOT / "tests" / "data" / "formats"
EPS = 1e-5  # float32 arithmetic on top of the quantisation
HALF_ALPHA = 0.5 / 255  # every format stores opacity as round(sigmoid * 255)
SMALLEST_THREE_10 = 0.5 * math.sqrt(0.5) / 511  # half a step of 9 magnitude bits over [0, sqrt(1/2)]
# The largest component is sqrt(1 - sum of the others' squares): with it >= 1/2 and sum |others| <= 3/2,
# an error e on each other one moves it by at most (3/2) e / (1/2) = 3 e.
DERIVED_LARGEST = 3 * SMALLEST_THREE_10


def scene(n: int, degree: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Values inside every format's range (SPZ: SH in [-1, 1), DC in +-3.3; .splat: colours in [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    rest = (degree + 1) ** 2 - 1
    return {
        "means": torch.rand(n, 3, generator=g) * 20 - 10,
        "scales": torch.rand(n, 3, generator=g) * 7 - 7,
        "quats": torch.randn(n, 4, generator=g) * 3,
        "opacities": torch.randn(n, generator=g) * 3,
        "sh0": torch.rand(n, 1, 3, generator=g) * 3.4 - 1.7,
        "shN": torch.rand(n, rest, 3, generator=g) * 1.8 - 0.9,
    }


def unit_quats(quats: torch.Tensor) -> torch.Tensor:
    """Normalised, sign chosen so the largest component is positive (q and -q are one rotation)."""
    q = quats.double() / quats.double().norm(dim=1, keepdim=True)
    largest = q.gather(1, q.abs().argmax(1, keepdim=True))
    return q * largest.sign()


def assert_close(name: str, got: torch.Tensor, expected: torch.Tensor, tolerance) -> None:
    assert got.shape == expected.shape, (name, got.shape, expected.shape)
    if not got.numel():
        return
    error = (got.double() - expected.double()).abs()
    limit = torch.as_tensor(tolerance, dtype=torch.float64).expand_as(error)
    worst = (error - limit).argmax()
    assert (error <= limit).all(), f"{name}: error {error.flatten()[worst]:.3g} > {limit.flatten()[worst]:.3g}"


def assert_rotations(got: torch.Tensor, expected: torch.Tensor, smaller: float, largest: float) -> None:
    a, b = unit_quats(expected), unit_quats(got)
    b = torch.where(((a - b).abs().amax(1) > (a + b).abs().amax(1))[:, None], -b, b)  # near-tie of the largest
    tolerance = torch.full_like(a, smaller)
    tolerance.scatter_(1, a.abs().argmax(1, keepdim=True), largest)
    assert_close("rotations", b, a, tolerance)


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
@pytest.mark.parametrize("version", [2, 3, 4])
def test_spz_round_trip_within_its_quantisation(tmp_path, degree, version):
    params = scene(300, degree, seed=degree)
    path = tmp_path / "scene.spz"
    write_spz(path, params, version=version)
    header = read_spz_header(path)
    assert (header["version"], header["points"], header["sh_degree"]) == (version, 300, degree)
    bits = header["fractional_bits"]
    assert bits == 12  # positions within +-10 fit 24 bits at 1/4096
    got = read_gaussians(path)
    assert_close("positions", got["means"], params["means"], 0.5 / (1 << bits) + EPS)
    assert_close("log scales", got["scales"], params["scales"], 0.5 / 16 + EPS)
    assert_close("opacities", torch.sigmoid(got["opacities"]), torch.sigmoid(params["opacities"]), HALF_ALPHA + EPS)
    assert_close("SH DC", got["sh0"], params["sh0"], 0.5 / (0.15 * 255) + EPS)
    # SH: round to 1/128, then to buckets of 8 (degree 1) or 16 (above) of those levels.
    tolerance = torch.full((params["shN"].shape[1], 3), 8.5 / 128)
    tolerance[:3] = 4.5 / 128
    assert_close("SH rest", got["shN"], params["shN"], tolerance + EPS)
    if version >= 3:
        assert_rotations(got["quats"], params["quats"], SMALLEST_THREE_10 + EPS, DERIVED_LARGEST + EPS)
    else:  # xyz of the w >= 0 quaternion in 8 bits; w = sqrt(1 - |xyz|^2) moves by at most sqrt(6 e + 3 e^2)
        e = 0.5 / 127.5
        expected = params["quats"].double() / params["quats"].double().norm(dim=1, keepdim=True)
        got_q = got["quats"].double() / got["quats"].double().norm(dim=1, keepdim=True)
        got_q = torch.where(((expected - got_q).abs().amax(1) > (expected + got_q).abs().amax(1))[:, None],
                            -got_q, got_q)
        assert_close("rotation xyz", got_q[:, 1:], expected[:, 1:], e + EPS)
        assert_close("rotation w", got_q[:, 0], expected[:, 0], math.sqrt(6 * e + 3 * e * e) + EPS)


def test_spz_positions_of_a_large_scene_keep_their_range(tmp_path):
    params = scene(50, 0)
    params["means"][0] = torch.tensor([5000.0, -3000.0, 12.0])  # past 24-bit fixed point at 12 fractional bits
    write_spz(tmp_path / "big.spz", params)
    bits = read_spz_header(tmp_path / "big.spz")["fractional_bits"]
    assert bits == 10  # 5000 * 2^10 < 2^23
    got = read_gaussians(tmp_path / "big.spz")
    assert_close("positions", got["means"], params["means"], 0.5 / (1 << bits) + 1e-3)


def test_splat_round_trip_within_its_quantisation(tmp_path):
    params = scene(300, 2)
    path = tmp_path / "scene.splat"
    write_splat(path, params)
    assert path.stat().st_size == 300 * 32
    got = read_gaussians(path)
    order = importance_order({k: v.numpy() for k, v in params.items()})
    expected = {key: value[torch.from_numpy(order)] for key, value in params.items()}
    sizes = expected["scales"].exp().prod(1) * torch.sigmoid(expected["opacities"])
    assert (sizes[:-1] >= sizes[1:]).all()  # largest first
    assert torch.equal(got["means"], expected["means"])
    assert_close("log scales", got["scales"], expected["scales"], 1e-6)
    assert_close("opacities", torch.sigmoid(got["opacities"]), torch.sigmoid(expected["opacities"]), HALF_ALPHA + EPS)
    rgb = lambda p: 0.5 + SH_C0 * p["sh0"]  # noqa: E731
    assert_close("colours", rgb(got), rgb(expected), 0.5 / 255 + EPS)
    assert got["shN"].shape == (300, 0, 3)  # no view-dependent colour in the format
    # q * 128 + 128 in a byte (1 clips at 255): a step of 1/128 before renormalising.
    assert_rotations(got["quats"], expected["quats"], 1 / 128, 1 / 128)


def test_compressed_ply_round_trip_within_its_quantisation(tmp_path):
    params = scene(3 * CHUNK - 60, 3)  # a short last chunk
    path = tmp_path / "scene.compressed.ply"
    write_compressed_ply(path, params)
    got = read_gaussians(path)
    order = torch.from_numpy(morton_order(params["means"].double().numpy()))
    assert sorted(order.tolist()) == list(range(len(order)))
    expected = {key: value[order] for key, value in params.items()}
    chunk = torch.arange(len(order)) // CHUNK

    def range_tolerance(values: torch.Tensor, bits: tuple[int, ...]) -> torch.Tensor:
        """Half a step of each axis's bits over its chunk's range (computed here from the inputs)."""
        low = torch.stack([values[chunk == c].amin(0) for c in range(int(chunk.max()) + 1)])[chunk]
        high = torch.stack([values[chunk == c].amax(0) for c in range(int(chunk.max()) + 1)])[chunk]
        return (high - low).double() / (2 * (2.0 ** torch.tensor(bits, dtype=torch.float64) - 1)) + EPS

    assert_close("positions", got["means"], expected["means"], range_tolerance(expected["means"], (11, 10, 11)))
    assert_close("log scales", got["scales"], expected["scales"], range_tolerance(expected["scales"], (11, 10, 11)))
    rgb = (0.5 + SH_C0 * expected["sh0"]).reshape(-1, 3)
    assert_close("colours", (0.5 + SH_C0 * got["sh0"]).reshape(-1, 3), rgb, range_tolerance(rgb, (8, 8, 8)))
    assert_close("opacities", torch.sigmoid(got["opacities"]), torch.sigmoid(expected["opacities"]), HALF_ALPHA + EPS)
    assert_close("SH rest", got["shN"], expected["shN"], 0.5 * 8 / 256 + EPS)  # bytes over [-4, 4)
    half = 0.5 * math.sqrt(2) / 1023  # 10 bits over [-sqrt(1/2), sqrt(1/2)]
    assert_rotations(got["quats"], expected["quats"], half + EPS, 3 * half + EPS)


@pytest.mark.parametrize("format", ["ply", "spz", "splat", "ply_compressed"])
def test_writers_are_atomic_and_refuse_a_diverged_model(tmp_path, format):
    params = scene(20, 1)
    path = tmp_path / "scene.out"
    write_gaussians(path, params, format)
    before = path.read_bytes()
    params["means"][3, 1] = float("nan")
    with pytest.raises(GaussianFileError, match="scene.out.*1 of 20 Gaussians have NaN"):
        write_gaussians(path, params, format)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["scene.out"]


# --- interoperability with PlayCanvas's splat-transform 3.7.0 (tests/data/formats/make_fixtures.py) ---


def matched(reference: dict, other: dict) -> dict:
    """``other``'s rows in ``reference``'s order, matched by nearest position (formats may reorder)."""
    distance, index = cKDTree(other["means"].numpy()).query(reference["means"].numpy())
    assert len(set(index.tolist())) == len(index) and distance.max() < 0.01
    return {key: value[torch.from_numpy(index)] for key, value in other.items()}


@pytest.mark.parametrize("name", ["st_v3.spz", "st_v4.spz", "st.compressed.ply"])
def test_reads_files_splat_transform_wrote(name):
    reference = load_ply(FIXTURES / "reference.ply")
    got = matched(reference, read_gaussians(FIXTURES / name))
    spz = name.endswith(".spz")  # same axes as the PLY: splat-transform and Niantic's ply_to_spz do not flip
    assert_close("positions", got["means"], reference["means"], 0.5 / 4096 + EPS if spz else 0.005)
    assert_close("log scales", got["scales"], reference["scales"], 0.5 / 16 + EPS if spz else 0.003)
    assert_close("opacities", torch.sigmoid(got["opacities"]), torch.sigmoid(reference["opacities"]),
                 HALF_ALPHA + EPS)
    assert_close("SH DC", got["sh0"], reference["sh0"], 0.5 / (0.15 * 255) + EPS if spz else 0.006)
    assert_close("SH rest", got["shN"], reference["shN"], 8.5 / 128 + EPS if spz else 1 / 64 + EPS)
    assert_rotations(got["quats"], reference["quats"], SMALLEST_THREE_10 + EPS, DERIVED_LARGEST + EPS)


def test_reads_a_degree_0_spz_v4_without_an_sh_stream():
    reference = load_ply(FIXTURES / "reference_deg0.ply")
    got = matched(reference, read_gaussians(FIXTURES / "st_deg0_v4.spz"))
    assert got["shN"].shape == (20, 0, 3)
    assert_close("positions", got["means"], reference["means"], 0.5 / 4096 + EPS)


@pytest.mark.parametrize("name", ["ours.spz", "ours_v4.spz", "ours.splat", "ours.compressed.ply"])
def test_splat_transform_decodes_our_files_as_we_do(name, tmp_path):
    """splat-transform's PLY of the committed file equals our decoding of it; today's writer still writes it."""
    ours = read_gaussians(FIXTURES / name)
    theirs = matched(ours, load_ply(FIXTURES / f"{name}.st.ply"))
    for key in ("means", "scales", "opacities", "sh0"):
        assert_close(key, theirs[key], ours[key], 1e-5)
    if not name.endswith(".splat"):
        assert_close("shN", theirs["shN"], ours["shN"], 1e-5)
    # splat-transform decodes .splat rotation bytes as b / 127.5 - 1, antimatter15 (and we) as (b - 128) / 128.
    assert_rotations(theirs["quats"], ours["quats"], 1 / 128 if name.endswith(".splat") else 1e-5, 1 / 64)
    format = {"ours.spz": "spz", "ours_v4.spz": "spz", "ours.splat": "splat"}.get(name, "ply_compressed")
    again = tmp_path / name
    if name == "ours_v4.spz":
        write_spz(again, load_ply(FIXTURES / "reference.ply"), version=4)
    else:
        write_gaussians(again, load_ply(FIXTURES / "reference.ply"), format)
    rewritten = read_gaussians(again)
    for key, value in ours.items():
        assert torch.equal(rewritten[key], value), key


# --- bad input ---


def spz_bytes(version: int, n: int, degree: int, payload: int, magic: int = 0x5053474E) -> bytes:
    return gzip.compress(struct.pack("<IIIBBBB", magic, version, n, degree, 12, 0, 0) + b"\0" * payload)


@pytest.mark.parametrize("case", ["mesh_ply", "spz_layout", "spz_degree", "spz_magic", "truncated_spz",
                                  "truncated_v4", "splat_size", "unknown", "missing"])
def test_bad_files_name_the_file_and_the_problem(tmp_path, case):
    path = tmp_path / f"{case}.bin"
    if case == "mesh_ply":
        path = tmp_path / "mesh.ply"
        vertices = np.zeros(4, [(axis, "<f4") for axis in "xyz"] + [(c, "u1") for c in ("red", "green", "blue")])
        PlyData([PlyElement.describe(vertices, "vertex")]).write(str(path))
        needle = "not a 3DGS PLY: missing vertex properties f_dc_0"
    elif case == "spz_layout":  # degree 1 announced, degree 0 data (n * 20 bytes a Gaussian)
        path.write_bytes(spz_bytes(3, 10, 1, 10 * 20))
        needle = "truncated: an SPZ v3 file of 10 Gaussians at SH degree 1 holds"
    elif case == "spz_degree":
        path.write_bytes(spz_bytes(3, 10, 4, 10 * (20 + 72)))
        needle = "SH degree 4"
    elif case == "spz_magic":
        path.write_bytes(spz_bytes(3, 10, 0, 10 * 20, magic=0x12345678))
        needle = "without the SPZ magic"
    elif case == "truncated_spz":
        data = (FIXTURES / "ours.spz").read_bytes()
        path.write_bytes(data[: len(data) // 2])
        needle = "truncated SPZ file"
    elif case == "truncated_v4":
        data = (FIXTURES / "ours_v4.spz").read_bytes()
        path.write_bytes(data[: len(data) - 100])
        needle = "truncated SPZ file: stream"
    elif case == "splat_size":
        path = tmp_path / "cut.splat"
        path.write_bytes((FIXTURES / "ours.splat").read_bytes()[:-5])
        needle = "not a whole number of 32-byte"
    elif case == "unknown":
        path.write_bytes(b"hello, not a scene")
        needle = "not a Gaussian scene file"
    else:
        needle = "no such file"
    with pytest.raises(GaussianFileError) as info:
        read_gaussians(path)
    assert path.name in str(info.value) and needle in str(info.value), str(info.value)


@pytest.mark.parametrize(("format", "needle"), [("spz", "SPZ: 1 SH values outside"),
                                                 ("ply_compressed", "compressed PLY: 1 SH values outside"),
                                                 ("splat", ".splat: 1 colour values outside")])
def test_values_a_format_cannot_hold_are_clamped_with_a_warning(tmp_path, caplog, format, needle):
    params = scene(10, 1)
    params["shN"][2, 1, 0] = 5.0  # past SPZ's [-1, 1) and compressed PLY's [-4, 4)
    params["sh0"][4, 0, 1] = 2.0  # 0.5 + SH_C0 * 2 > 1: past .splat's colour byte
    with caplog.at_level("WARNING"):
        write_gaussians(tmp_path / "scene", params, format)
    assert needle in caplog.text, caplog.text

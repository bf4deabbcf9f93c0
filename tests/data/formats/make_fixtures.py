"""Regenerate the interoperability fixtures with PlayCanvas's splat-transform (an independent implementation).

Needs Node.js and ``npm install @playcanvas/splat-transform@3.7.0`` (its ``splat-transform`` on PATH or in
``node_modules/.bin``). Run from the repository root: ``python tests/data/formats/make_fixtures.py``.

- ``reference.ply``: 200 random Gaussians at SH degree 3 (ranges every format can hold), and
  ``reference_deg0.ply`` with 20 at degree 0; written by ``save_ply``.
- ``st_*``: splat-transform's conversions of them (SPZ v3 and v4, compressed PLY).
- ``ours.*``: this package's writers on ``reference.ply``, and ``ours.*.st.ply`` splat-transform's
  decoding of each back to a standard PLY.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from lightning_grendel.splatting.formats.compressed_ply import write_compressed_ply  # noqa: E402
from lightning_grendel.splatting.formats.splat import write_splat  # noqa: E402
from lightning_grendel.splatting.formats.spz import write_spz  # noqa: E402
from lightning_grendel.splatting.ply import load_ply, save_ply  # noqa: E402


def reference(count: int, degree: int, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    rest = (degree + 1) ** 2 - 1
    arrays = {
        "means": rng.uniform(-5, 5, (count, 3)),
        "scales": rng.uniform(-6, 0, (count, 3)),
        "quats": rng.normal(size=(count, 4)),
        "opacities": rng.normal(0, 2, count),
        "sh0": rng.uniform(-1.5, 1.5, (count, 1, 3)),
        "shN": rng.uniform(-0.9, 0.9, (count, rest, 3)),
    }
    return {key: torch.from_numpy(value.astype(np.float32)) for key, value in arrays.items()}


def convert(tool: str, source: Path, target: Path, *options: str) -> None:
    subprocess.run([tool, "-q", "-w", *options, str(source), str(target)], check=True)


def main() -> None:
    tool = shutil.which("splat-transform") or str(Path("node_modules/.bin/splat-transform").resolve())
    save_ply(HERE / "reference.ply", reference(200, 3, seed=7))
    save_ply(HERE / "reference_deg0.ply", reference(20, 0, seed=8))
    convert(tool, HERE / "reference.ply", HERE / "st_v3.spz", "--spz-version", "3")
    convert(tool, HERE / "reference.ply", HERE / "st_v4.spz", "--spz-version", "4")
    convert(tool, HERE / "reference_deg0.ply", HERE / "st_deg0_v4.spz", "--spz-version", "4")
    convert(tool, HERE / "reference.ply", HERE / "st.compressed.ply")
    params = load_ply(HERE / "reference.ply")
    write_spz(HERE / "ours.spz", params)
    write_spz(HERE / "ours_v4.spz", params, version=4)
    write_splat(HERE / "ours.splat", params)
    write_compressed_ply(HERE / "ours.compressed.ply", params)
    for name in ("ours.spz", "ours_v4.spz", "ours.splat", "ours.compressed.ply"):
        convert(tool, HERE / name, HERE / f"{name}.st.ply")


if __name__ == "__main__":
    main()

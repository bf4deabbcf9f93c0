"""A wheel install works like a clone: it carries the C++ source and the recipes, and uses them.

The wheel is built from a copy of the tree and installed with ``--no-deps`` into a fresh venv that sees
the test venv's packages through a ``.pth`` line (the editable install's own ``.pth`` hooks are not
processed there, so ``import lightning_grendel`` finds the wheel).
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers.paths import REPO_ROOT

_SKIP = shutil.ignore_patterns(".venv", ".git", "build", "dist", "lightning_logs", "*.egg-info", "__pycache__",
                               ".pytest_cache", ".ruff_cache", "gpu_carry", "outputs", "results")


def _run(*args: str | Path, cwd: Path, timeout: float) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.timeout(600)
def test_wheel_install_renders_with_cpp_and_runs_a_recipe_by_name(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT, source, ignore=_SKIP, symlinks=True)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".", "-w", tmp_path / "dist",
         cwd=source, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("lightning_grendel-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "lightning_grendel").glob("**/csrc/*")}
    assert "lightning_grendel/splatting/csrc/ssim.cpp" in sources
    assert sources <= names, f"C++ sources missing from the wheel: {sorted(sources - names)}"
    assert {"lightning_grendel/recipes/gaussian/demo.yaml", "lightning_grendel/recipes/smoke/gaussian.yaml"} <= names

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path, timeout=300)
    python = venv / "bin" / "python"
    venv_site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path,
                          timeout=300).strip())
    (venv_site / "test_venv_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel, cwd=tmp_path,
         timeout=300)

    probe = (
        "import torch, lightning_grendel, lightning_grendel.splatting.rasterize as r;"
        "print(lightning_grendel.__file__); print(r.resolve_backend('auto', torch.device('cpu')))"
    )
    location, backend = _run(python, "-c", probe, cwd=tmp_path, timeout=300).split()[-2:]
    assert location.startswith(str(venv_site)), location
    assert backend == "cpp"
    _run(python, "-m", "lightning_grendel", "fit", "-c", "smoke/gaussian", "--trainer.max_steps", "2",
         "--trainer.default_root_dir", tmp_path / "runs", cwd=tmp_path, timeout=300)
    assert (tmp_path / "runs" / "smoke" / "version_0" / "point_cloud.ply").is_file()

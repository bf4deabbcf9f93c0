"""What ``lightning-grendel fit`` writes, read back by the command itself: ``render --ckpt`` and ``test``.

For every kind of checkpoint the CLI writes (one process with Inria's densification, MCMC with the
antialiased rasterizer, a GrendelStrategy sharded directory from two ranks): ``fit`` leaves
``last.ckpt`` at its last step whatever ``max_steps``; ``render`` rebuilds the module from the saved
hyperparameters as ``fit`` parsed them, and its mean PSNR equals the one ``test`` reports for the
same checkpoint; its outputs get the modes the umask gives. A run that fails before its first step
leaves no ``version_N`` behind, so the next run is ``version_0``.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_grendel._hparams import instantiate_from_hparams
from lightning_grendel.splatting.grendel.checkpoint import load_sharded
from lightning_grendel.splatting.mcmc import MCMCDensifier
from lightning_grendel.splatting.module import GaussianSplattingModule

MCMC = ('{"class_path": "lightning_grendel.splatting.mcmc.MCMCConfig", '
        '"init_args": {"cap_max": 3000, "start_images": 1, "stop_images": 5, "every_images": 2}}')
CASES = {  # name: (recipe, its logger's folder, extra fit arguments)
    "inria": ("smoke/gaussian", "smoke", []),
    "mcmc_antialiased": ("smoke/gaussian", "smoke", ["--model.densify", MCMC, "--model.rasterize_mode", "antialiased"]),
    "grendel_directory": ("smoke/grendel", "smoke_grendel", []),
}
STEPS = 3  # between the recipes' saves: only the end-of-fit save can leave last.ckpt at this step


def lightning_grendel(*args: str, cwd: Path, umask: int | None = None) -> str:
    env = {key: value for key, value in os.environ.items() if key not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    result = subprocess.run([sys.executable, "-m", "lightning_grendel", *args], cwd=cwd, env=env, text=True,
                            capture_output=True, timeout=900,
                            preexec_fn=None if umask is None else (lambda: os.umask(umask)))
    assert result.returncode == 0, f"{args}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def reported_test_psnr(output: str) -> float:
    """``test/psnr`` from the table of results Lightning prints (rank 0 prints it)."""
    (value,) = re.findall(r"test/psnr\s*[│|]\s*([0-9.]+)", output)
    return float(value)


@pytest.mark.timeout(2400)
@pytest.mark.parametrize("case", list(CASES))
def test_render_and_test_read_what_fit_wrote(case, tmp_path):
    recipe, name, extra = CASES[case]
    fit = ["fit", "-c", recipe, "--trainer.default_root_dir", "runs", "--trainer.max_steps", str(STEPS), *extra]
    if case == "inria":  # first a run that fails in its data setup, after the logger chose version_0
        failed = subprocess.run([sys.executable, "-m", "lightning_grendel", *fit, "--data.format", "blender",
                                 "--data.path", "missing"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert failed.returncode == 2 and not (tmp_path / "runs").exists(), failed.stderr[-2000:]
    lightning_grendel(*fit, cwd=tmp_path)
    last = tmp_path / "runs" / name / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = load_sharded(last, 0, 1) if last.is_dir() else torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == STEPS and last.is_dir() == (case == "grendel_directory")

    module = instantiate_from_hparams(GaussianSplattingModule, checkpoint["hyper_parameters"], str(last))
    assert isinstance(module.densifier, MCMCDensifier) == (case == "mcmc_antialiased")
    assert module.hparams.rasterize_mode == ("antialiased" if case == "mcmc_antialiased" else "classic")

    lightning_grendel("render", "--ckpt", str(last), "--out", "renders", "--path-frames", "2", cwd=tmp_path,
                      umask=0o027)
    out = tmp_path / "renders"
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (out, out / "orbit.mp4", out / "metrics.json",
                                                                      next((out / "test").glob("*.png")))}
    assert set(modes.values()) <= {0o750, 0o640} and modes["renders"] == 0o750, modes
    rendered = json.loads((out / "metrics.json").read_text())["psnr"]

    tested = lightning_grendel("test", "-c", recipe, *extra, "--ckpt_path", str(last), "--trainer.default_root_dir",
                               "tested", "--trainer.logger", "false", cwd=tmp_path)
    assert rendered == pytest.approx(reported_test_psnr(tested), abs=1e-4)

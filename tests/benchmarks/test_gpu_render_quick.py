"""The GPU benchmark scripts stay runnable without a GPU: gpu_render.py's CPU smoke mode, and the shell
scripts' syntax (they run on the device machine, where a typo would cost a whole device call)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers.paths import REPO_ROOT

BENCHMARKS = REPO_ROOT / "benchmarks"


@pytest.mark.timeout(120)
def test_gpu_render_quick_on_cpu_reports_our_time_and_says_why_gsplat_is_skipped(tmp_path):
    command = [sys.executable, str(BENCHMARKS / "gpu_render.py"), "--device", "cpu", "--quick"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=100, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    values = dict(line.split(" ", 1)[1].split("=") for line in result.stdout.splitlines() if line.startswith("RESULT "))
    assert set(values) == {"gpu.ms_ours", "gpu.ms_ours_torch_projection"}
    assert all(float(value) > 0 for value in values.values())
    assert "gsplat comparison skipped: device is cpu" in result.stdout
    assert "| ours (torch) |" in result.stdout and "| ours (torch, torch projection) |" in result.stdout


@pytest.mark.timeout(60)
def test_gpu_render_refuses_cuda_without_a_device():
    if torch.cuda.is_available():
        pytest.skip("checks the error on a machine without CUDA")
    command = [sys.executable, str(BENCHMARKS / "gpu_render.py"), "--device", "cuda"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=50)
    assert result.returncode != 0 and "no CUDA device here" in result.stderr


@pytest.mark.parametrize("script", ["gpu_check.sh", "prepare_gpu_carry.sh"])
def test_gpu_shell_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(BENCHMARKS / script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr

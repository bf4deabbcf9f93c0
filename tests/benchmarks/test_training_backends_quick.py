"""The cpp-vs-torch training benchmark's quick mode trains both backends and reports every RESULT line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.paths import REPO_ROOT

REPO = REPO_ROOT


@pytest.mark.timeout(600)
def test_training_backends_quick_reports_both_backends(shared_dataset, tmp_path):
    data = shared_dataset("nerf_synthetic_blocks")
    command = [sys.executable, str(REPO / "benchmarks" / "training_backends.py"), "--quick", "--data", str(data)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=540, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    values = dict(line.split(" ", 1)[1].split("=") for line in result.stdout.splitlines() if line.startswith("RESULT "))
    assert set(values) == {"training.cpp_seconds_to_target", "training.torch_psnr_at_cpp_time",
                           "training.torch_over_cpp_seconds_per_step"}
    assert float(values["training.torch_over_cpp_seconds_per_step"]) > 1.0  # the C++ kernels beat the reference
    rows = [line for line in result.stdout.splitlines() if line.startswith("| cpp ") or line.startswith("| torch ")]
    assert len(rows) == 2

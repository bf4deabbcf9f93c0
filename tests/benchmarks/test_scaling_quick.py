"""The scaling experiment's quick mode runs end to end and reports every RESULT line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.paths import REPO_ROOT

REPO = REPO_ROOT


@pytest.mark.timeout(900)
def test_scaling_quick_prints_results_table_and_plot(shared_dataset, tmp_path):
    data = shared_dataset("nerf_synthetic_blocks")
    command = [sys.executable, str(REPO / "benchmarks" / "scaling.py"), "--quick", "--data", str(data),
               "--out", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=840, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    values = dict(line.split(" ", 1)[1].split("=") for line in result.stdout.splitlines() if line.startswith("RESULT "))
    assert set(values) == {"scaling.psnr_w1", "scaling.psnr_w4", "scaling.gaussians_w4_over_w1"}
    assert float(values["scaling.gaussians_w4_over_w1"]) > 1.0  # four shards of the same capacity hold more
    assert (tmp_path / "out" / "scaling.md").read_text().count("\n") == 4
    assert (tmp_path / "out" / "psnr_vs_gaussians.png").stat().st_size > 1000

"""The colmap time-to-PSNR benchmark's quick mode trains both runs, on the kernels each is meant to use."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "colmap_time_to_psnr.py"


def calls(stdout: str, run: str) -> dict[str, int]:
    """The ``CALLS <run> kernel=count ...`` line of ``run`` as a dict."""
    line = next(line for line in stdout.splitlines() if line.startswith(f"CALLS {run} "))
    return {kernel: int(count) for kernel, count in (pair.split("=") for pair in line.split()[2:])}


@pytest.mark.timeout(120)
def test_colmap_time_to_psnr_quick_reports_both_runs_on_their_kernels(shared_dataset, tmp_path):
    data = shared_dataset("colmap_blocks")
    command = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--data", str(data)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    values = dict(line.split(" ", 1)[1].split("=") for line in result.stdout.splitlines() if line.startswith("RESULT "))
    assert set(values) == {"colmap.before_seconds_to_target", "colmap.after_seconds_to_target",
                           "colmap.time_to_target_speedup", "colmap.projection_sh_fraction"}
    for value in values.values():
        assert value == "not_reached" or float(value) > 0
    before, after = calls(result.stdout, "before"), calls(result.stdout, "after")
    assert before["scalar_rasterizer"] > 0 and before["torch_ssim_loss"] > 0
    assert before["simd_rasterizer"] == 0 and before["fused_ssim_loss"] == 0
    assert after["simd_rasterizer"] > 0 and after["fused_ssim_loss"] > 0
    assert after["scalar_rasterizer"] == 0 and after["torch_ssim_loss"] == 0
    assert before["torch_projection"] > 0 and before["fused_projection"] == 0
    assert after["fused_projection"] > 0 and after["torch_projection"] == 0
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| before ", "| after "))]
    assert len(rows) == 2

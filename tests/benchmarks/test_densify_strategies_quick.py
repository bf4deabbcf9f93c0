"""The densification benchmark's quick mode trains both strategies and gives MCMC the default's final count."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.paths import REPO_ROOT


@pytest.mark.timeout(300)
def test_densify_strategies_quick_reports_both_strategies(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "densify_strategies.py"), "--quick"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    values = dict(line.split(" ", 1)[1].split("=") for line in result.stdout.splitlines() if line.startswith("RESULT "))
    for strategy in ("default", "mcmc"):
        for key in ("psnr", "ssim", "seconds", "gaussians"):
            assert f"densify.{strategy}_{key}_demo" in values
    assert float(values["densify.mcmc_gaussians_demo"]) == float(values["densify.default_gaussians_demo"])

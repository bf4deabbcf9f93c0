"""Every benchmark script still imports and parses its arguments (a moved module breaks none silently)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.paths import REPO_ROOT

SCRIPTS = sorted(p for p in (REPO_ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_starts(script):
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout

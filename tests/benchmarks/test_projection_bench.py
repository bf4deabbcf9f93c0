"""The projection benchmark's quick mode times both paths and reports every RESULT line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "projection.py"


@pytest.mark.timeout(180)
def test_projection_quick_reports_both_paths(tmp_path):
    command = [sys.executable, str(SCRIPT), "--quick", "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=170, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    values = dict(line.split(" ", 1)[1].split("=") for line in result.stdout.splitlines() if line.startswith("RESULT "))
    assert set(values) == {"projection.torch_ms", "projection.cpp_ms", "projection.speedup"}
    assert all(float(value) > 0 for value in values.values())

"""The optimizer benchmark's quick mode times both Adam variants and reports every RESULT line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "optimizer.py"


@pytest.mark.timeout(120)
def test_optimizer_quick_reports_both_variants(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1"], capture_output=True,
                            text=True, timeout=110, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    values = dict(line.split(" ", 1)[1].split("=") for line in result.stdout.splitlines() if line.startswith("RESULT "))
    assert set(values) == {"optimizer.default_ms", "optimizer.fused_ms", "optimizer.speedup"}
    assert all(float(value) > 0 for value in values.values())

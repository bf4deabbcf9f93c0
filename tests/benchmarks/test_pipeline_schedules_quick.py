"""The pipeline schedule benchmark's quick mode runs end to end and prints every RESULT line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.paths import REPO_ROOT


@pytest.mark.timeout(120)
def test_pipeline_schedules_quick_prints_results():
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "pipeline_schedules.py"), "--quick"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=110, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    values = {line.split(" ", 1)[1].split("=")[0]: float(line.split("=")[1])
              for line in result.stdout.splitlines() if line.startswith("RESULT ")}
    assert {"pipeline.interleaved_gain_fraction", "pipeline.zero_bubble_gain_fraction"} <= set(values)
    assert values["pipeline.zb_h1_step_s"] < values["pipeline.1f1b_step_s"]  # the bubble it removes is 25% here
    assert "| interleaved_1f1b | 2 |" in result.stdout and "| zbv | 2 |" in result.stdout
    assert "pipeline.zbv_gain_fraction" in values  # DualPipeV needs 8 micro-batches: not in quick mode

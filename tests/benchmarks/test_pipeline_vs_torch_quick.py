"""The pipeline-vs-torch benchmark's quick mode: both pipelines train to the same losses, every RESULT printed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.paths import REPO_ROOT


@pytest.mark.timeout(300)
def test_pipeline_vs_torch_quick_reaches_torchs_losses():
    """Two stages, five schedule pairs (the V-shaped ZBV and DualPipeV included), 3 steps each from the
    same weights on the same batches: this project's losses equal torch.distributed.pipelining's within
    1e-4 at every step."""
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "pipeline_vs_torch.py"), "--quick"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=290, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    values = {line.split(" ", 1)[1].split("=")[0]: float(line.split("=")[1])
              for line in result.stdout.splitlines() if line.startswith("RESULT ")}
    assert values["pipeline_vs_torch.loss_gap"] <= 1e-4
    for schedule in ("1f1b", "interleaved_1f1b", "zb_h1", "zbv", "dualpipev"):
        assert values[f"pipeline_vs_torch.2stages.{schedule}.ratio"] > 0
    assert values["pipeline_vs_torch.split_over_fused_backward"] > 0

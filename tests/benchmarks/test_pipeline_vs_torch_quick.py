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
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    values = {line.split(" ", 1)[1].split("=")[0]: float(line.split("=")[1])
              for line in result.stdout.splitlines() if line.startswith("RESULT ")}
    assert values["pipeline_vs_torch.loss_gap"] <= 1e-4
    for schedule in ("1f1b", "interleaved_1f1b", "zb_h1", "zbv", "dualpipev"):
        assert values[f"pipeline_vs_torch.2stages.{schedule}.ratio"] > 0
    assert values["pipeline_vs_torch.split_over_fused_backward"] > 0


@pytest.mark.timeout(300)
def test_tensor_parallel_pipeline_vs_torch_quick_reaches_torchs_losses():
    """A column-parallel stage on a (1,2) mesh feeding a data-parallel (2,1) mesh, against torch's 4-stage
    schedules and 2 stages x 2 replicas on the same model, weights and batches: every step's loss equal
    within 1e-4 (tensor parallelism and the replicas reorder sums, so not bit for bit)."""
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "pipeline_tp_vs_torch.py"), "--quick", "--loopback-only"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    values = {line.split(" ", 1)[1].split("=")[0]: float(line.split("=")[1])
              for line in result.stdout.splitlines() if line.startswith("RESULT ")}
    assert values["pipeline_vs_torch.tp.loss_gap"] <= 1e-4
    assert values["pipeline_vs_torch.tp_vs_best_torch_loopback"] > 0
    for name in ("ours_tp_1f1b", "ours_tp_zb_h1", "torch_1f1b_4stages", "torch_1f1b_2stages_2dp"):
        assert values[f"pipeline_vs_torch.tp.loopback.{name}_tokens_s"] > 0

"""The time-to-quality benchmark's quick mode: one run per call kept in the results file, the new run
reading today's Gaussian count from it, and the report with every RESULT line once both are there."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "time_to_quality.py"


@pytest.mark.timeout(300)
def test_time_to_quality_quick_runs_today_then_new_and_reports(shared_dataset, tmp_path):
    root = shared_dataset("nerf_synthetic_blocks").parent
    results = tmp_path / "ttq_{dataset}.json"
    base = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--dataset", "blender",
            "--data-root", str(root), "--results", str(results)]
    refused = subprocess.run([*base, "--run", "new"], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert refused.returncode != 0 and "no today run of blender yet" in refused.stderr
    outputs = []
    for run in ("today", "new"):
        result = subprocess.run([*base, "--run", run], capture_output=True, text=True, timeout=240, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
        outputs.append(result.stdout)
    assert "RESULT" not in outputs[0]  # one run alone: nothing to compare yet
    values = dict(line.split(" ", 1)[1].split("=") for line in outputs[1].splitlines() if line.startswith("RESULT "))
    assert set(values) == {"time_to_quality.ratio_blender", "time_to_quality.psnr_delta_blender",
                           "time_to_quality.gaussians_blender"}
    kept = json.loads((tmp_path / "ttq_blender.json").read_text())
    assert values["time_to_quality.gaussians_blender"] == f"{kept['new']['gaussians']}/{kept['today']['gaussians']}"
    assert kept["new"]["gaussians"] <= kept["today"]["gaussians"]  # the growth budget is today's count
    assert list(tmp_path.iterdir()) == [tmp_path / "ttq_blender.json"]  # nothing else written

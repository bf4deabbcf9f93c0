"""End to end: the shipped recipe runs through the package CLI (popen launcher, 4 gloo processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_three_stage_recipe_runs_through_the_cli(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(key, None)
    recipe = REPO / "recipes/pipeline/tiny_lm_3stages.yaml"
    command = [sys.executable, "-m", "lightning_grendel", "fit", "-c", str(recipe), "--trainer.max_steps",
               "3", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max_steps=3" in result.stderr + result.stdout

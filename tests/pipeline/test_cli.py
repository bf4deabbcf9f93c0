"""End to end: shipped recipes run through the package CLI (popen launcher, 4 gloo processes each)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO_ROOT

REPO = REPO_ROOT


@pytest.mark.timeout(300)
@pytest.mark.parametrize("recipe, steps", [("tiny_lm_3stages.yaml", 3), ("tensor_parallel.yaml", 2)])
def test_pipeline_recipe_runs_through_the_cli(tmp_path, recipe, steps):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(key, None)
    command = [sys.executable, "-m", "lightning_grendel", "fit", "-c", str(REPO / "recipes/pipeline" / recipe),
               "--trainer.max_steps", str(steps), "--trainer.logger", "false", "--trainer.enable_progress_bar",
               "false"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"max_steps={steps}" in result.stderr + result.stdout

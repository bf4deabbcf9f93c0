"""The command line as a user meets it: recipes by name, outputs under --trainer.default_root_dir."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lightning_grendel._recipes import RECIPES_ROOT, recipe_names, resolve_config_args


def test_every_shipped_recipe_is_listed_and_resolves_by_name():
    names = recipe_names()
    assert {"gaussian/demo", "gaussian/grendel_cpu", "hyperbolic/cora", "pipeline/tiny_lm_3stages"} <= set(names)
    for name in names:
        assert resolve_config_args(["fit", "-c", name]) == ["fit", "-c", str(RECIPES_ROOT / f"{name}.yaml")]
    assert resolve_config_args(["--config=gaussian/demo.yaml"]) == [f"--config={RECIPES_ROOT / 'gaussian/demo.yaml'}"]
    assert resolve_config_args(["-c", "no/such_recipe"]) == ["-c", "no/such_recipe"]  # left to the CLI's own error


def test_recipes_command_lists_names_with_their_summaries():
    out = subprocess.run([sys.executable, "-m", "lightning_grendel", "recipes"], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert "gaussian/demo" in out and "procedural demo scene" in out


@pytest.mark.timeout(300)
def test_default_root_dir_moves_every_output_of_a_run(tmp_path):
    root = tmp_path / "elsewhere"
    subprocess.run([sys.executable, "-m", "lightning_grendel", "fit", "-c", "smoke/gaussian",
                    "--trainer.default_root_dir", str(root), "--trainer.max_steps", "2"],
                   cwd=tmp_path, check=True, timeout=280, capture_output=True)
    run = root / "smoke" / "version_0"
    assert any(p.name.startswith("events.out.tfevents") for p in run.iterdir())
    assert (run / "config.yaml").is_file() and (run / "point_cloud.ply").is_file()
    assert list((run / "checkpoints").glob("*.ckpt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]  # nothing written beside it


def test_a_blender_recipe_without_a_path_names_the_flag(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lightning_grendel", "fit", "-c", "gaussian/blender",
                             "--trainer.default_root_dir", str(tmp_path)], capture_output=True, text=True,
                            timeout=280)
    assert result.returncode != 0 and "--data.path" in result.stderr

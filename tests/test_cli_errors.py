"""A newcomer's mistakes end in one line, ``error: <message>``, that names what to fix (exit status 2).

Each case runs the installed command in a fresh process, as a user would, and counts what it prints:
nothing but Lightning's start-up notices and the one error line, never a traceback (that takes
``--traceback`` or ``LG_DEBUG=1``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Lightning's own start-up lines, printed before the run reaches the data
NOTICES = ("Seed set to", "[rank: 1] Seed set to", "GPU available", "TPU available", "HPU available")


def lightning_grendel(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_grendel", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})


def assert_one_error_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    lines = (result.stdout + result.stderr).splitlines()
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in lines if not line.startswith(NOTICES)]
    assert len(errors) == 1 and errors[0].startswith("error: "), lines  # the line count of the whole output
    assert len(lines) <= 1 + len(NOTICES)
    assert result.returncode == 2
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


MISTAKES = {  # name: (arguments, what the line must say); {blender} is the shared NeRF-synthetic folder
    "wrong data path": (["fit", "-c", "gaussian/blender", "--data.path", "no/such/folder"], ["no/such/folder"]),
    "colmap recipe on a blender folder": (["fit", "-c", "gaussian/colmap", "--data.path", "{blender}"],
                                          ["COLMAP", "nerf_synthetic_blocks"]),
    "recipe without a data path": (["fit", "-c", "gaussian/blender"], ["--data.path"]),
    "hyperbolic recipe without a data path": (["fit", "-c", "hyperbolic/wn18rr"], ["--data.path"]),
    "misspelt recipe": (["fit", "-c", "gaussian/blendr"], ["did you mean gaussian/blender?",
                                                          "`lightning-grendel recipes`"]),
    "misspelt command": (["trian", "-c", "gaussian/demo"], ["did you mean 'fit'?", "render", "recipes"]),
    "misspelt option": (["fit", "-c", "gaussian/demo", "--trainer.max_stepz", "3"],
                        ["error: --trainer.max_stepz 3: no such option", "lightning-grendel fit --help"]),
    "bad option value": (["fit", "-c", "gaussian/demo", "--trainer.max_steps", "many"],
                         ["error: --trainer.max_steps:", "many"]),
    "render into an existing folder": (["render", "--ckpt", "missing.ckpt", "--out", "."], ["--out", "already exists"]),
    "render a missing checkpoint": (["render", "--ckpt", "missing.ckpt", "--out", "renders"], ["--ckpt missing.ckpt"]),
    "view a missing file": (["view", "missing.ply", "--port", "0"], ["missing.ply: no such file"]),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_mistake_prints_one_line(mistake, tmp_path, shared_dataset):
    args, needles = MISTAKES[mistake]
    if "{blender}" in args:
        args = [arg.replace("{blender}", str(shared_dataset("nerf_synthetic_blocks"))) for arg in args]
    assert_one_error_line(lightning_grendel(*args, "--trainer.default_root_dir", "runs", cwd=tmp_path)
                          if args[0] == "fit" else lightning_grendel(*args, cwd=tmp_path), *needles)
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # no run folder left behind


@pytest.mark.timeout(300)
def test_traceback_on_request(tmp_path):
    for extra, env in ((["--traceback"], None), ([], {"LG_DEBUG": "1"})):
        result = lightning_grendel("fit", "-c", "gaussian/blender", *extra, cwd=tmp_path, env=env)
        assert result.returncode == 1 and "Traceback" in result.stderr
        assert "format='blender' needs a dataset folder: pass --data.path" in result.stderr


def test_help_lists_every_command_on_one_line_each(tmp_path):
    from lightning_grendel.cli import COMMANDS

    out = lightning_grendel("--help", cwd=tmp_path).stdout
    for command in ("fit", "validate", "test", "predict", "render", "recipes"):
        (line,) = [line for line in out.splitlines() if line.split()[:1] == [command]]
        assert line.split(None, 1)[1] == COMMANDS[command]


def test_recipes_prints_whole_first_sentences(tmp_path):
    out = lightning_grendel("recipes", cwd=tmp_path).stdout
    from lightning_grendel._recipes import recipe_names

    lines = out.splitlines()[1:]
    assert [line.split()[0] for line in lines] == recipe_names()
    for line in lines:
        assert line.endswith(".") and line.count("(") == line.count(")"), line
    assert "HGCN ships a networkx pickle: convert it to the three files first)." in out


@pytest.mark.timeout(600)
def test_every_rank_of_a_multi_process_run_says_which_it_is(tmp_path):
    result = lightning_grendel("fit", "-c", "smoke/grendel", "--data.format", "blender", "--data.path", "missing",
                               "--trainer.default_root_dir", "runs", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert 1 <= len(errors) <= 2, result.stderr[-3000:]  # at most one line per rank
    assert {line.split(": ", 1)[1] for line in errors} == {"missing/transforms_train.json: NeRF-synthetic transforms "
                                                          "file not found"}
    assert {line.split(": ", 1)[0] for line in errors} <= {"error", "error (rank 1)"}
    assert not (tmp_path / "runs").exists()

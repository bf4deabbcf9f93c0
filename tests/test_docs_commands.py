"""Every ``lightning-grendel`` command and every Python snippet in README.md and docs/ runs as written.

Commands: each line of a fenced ``bash`` block that runs ``lightning-grendel`` (after ``.venv/bin/``,
``VAR=value`` and ``nice -n N``), ``\\`` continuations joined, comments dropped. Identical commands
run once; all run in one working folder in document order, so a ``test`` or ``render`` finds what the
``fit`` before it wrote (under the paths the docs print). What the test changes, and only that:

- ``../shared/data/`` is the shared datasets' folder (the docs are read from the repository root);
- a step cap is appended to ``fit`` / ``validate`` / ``test`` (:data:`CAPS`), ``render`` draws
  :data:`RENDER_CAP` frames, and a ``gaussian/*`` recipe runs at :data:`GAUSSIAN_CAP`;
- the placeholders in :data:`PLACEHOLDERS` (``...``, ``path/to/last.ckpt``) stand for the dataset of
  the recipe or the checkpoint its capped ``fit`` wrote; a glob is expanded as bash would; a checkpoint
  the docs name by an epoch the capped run did not reach (``best-epoch=520.ckpt``) is the one the
  capped ``fit`` of that recipe wrote;
- commands in :data:`SKIPPED` are skipped with the reason (a GPU, or another test runs them verbatim).

Python snippets: each ``python`` block runs in a fresh interpreter with ``../shared/data/`` as above,
Trainer defaults capped through Lightning's ``PL_TRAINER_*`` variables and a literal
``max_steps=N`` cut to 2; a ``# needs: N ranks`` comment runs it on N gloo ranks, the process group
already set up. A failure names the file and line of the command or snippet.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lightning_grendel.hyperbolic.data.disease import generate_disease_like, write_hgcn_folder
from tests.helpers.distributed import run_distributed
from tests.helpers.nerfstudio_capture import write_capture_from_colmap
from tests.helpers.paths import REPO_ROOT, SHARED_DATA

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
CAPS = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
        "--trainer.limit_predict_batches", "1", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false"]
RENDER_CAP = ["--path-frames", "2"]
GAUSSIAN_CAP = ["--data.image_width", "32"]  # a 3DGS recipe's cost is its image size
RECIPE_DATA = {"gaussian/blender": "nerf_synthetic_blocks", "gaussian/grendel_cpu": "nerf_synthetic_blocks",
               "gaussian/scaling_w4": "nerf_synthetic_blocks", "gaussian/colmap": "colmap_blocks",
               "hyperbolic/wn18rr": "wn18rr", "hyperbolic/cora": "cora", "hyperbolic/cora_lp": "cora"}
PLACEHOLDERS = {  # an argument the docs leave to the reader -> what it stands for here
    "...": "the shared dataset of the command's recipe",
    "path/to/last.ckpt": "last.ckpt of the recipe's capped fit (gaussian/blender's for a command without -c)",
    "last.ckpt": "the same as path/to/last.ckpt",
    "path/to/grendel_checkpoint_dir": "last.ckpt of the gaussian/grendel_cpu fit (a sharded directory)",
    "point_cloud.ply": "point_cloud.ply of the recipe's capped fit",
    "PATH/disease_lp": "a generated Disease-like graph in HGCN's layout",
    "capture/": "colmap_blocks written as ns-process-data writes a capture (tests/helpers/nerfstudio_capture.py)",
}
DEFAULT_RECIPE = "gaussian/blender"  # what a command without -c (export, view) reads
SKIPPED = {  # a command that starts with this -> why it does not run here
    "fit -c gaussian/grendel_gpu": "needs CUDA GPUs (NCCL, 4 devices)",
    "fit -c gaussian/scaling_w4": "4 ranks; run verbatim by tests/benchmarks/test_scaling_quick.py",
    "fit -c pipeline/tiny_lm_3stages": "4 ranks; run verbatim by tests/pipeline/test_cli.py",
    "fit -c pipeline/tensor_parallel": "4 ranks; run verbatim by tests/pipeline/test_cli.py",
    "view ": "serves until Ctrl-C; tests/splatting/test_viewer_browser.py opens `view` of a checkpoint in Chromium",
}
RANKS = re.compile(r"#\s*needs:\s*(\d+)\s+ranks")


@dataclass
class Snippet:
    """A command (argument list) or Python code, with every place the docs write it."""

    code: str
    places: list[str] = field(default_factory=list)


def _fenced_blocks(path: Path) -> list[tuple[str, int, str]]:
    text = path.read_text()
    return [(match[1], text.count("\n", 0, match.start()) + 2, match[2])
            for match in re.finditer(r"^[ \t]*```(\w*)[^\n]*\n(.*?)^[ \t]*```", text, re.S | re.M)]


COMMAND_LINE = re.compile(r"\s*(\w+=\S*\s+)*(nice\s+-n\s+\d+\s+)?(\S*/)?lightning-grendel(\s|$)")


def _command(line: str) -> list[str] | None:
    if not COMMAND_LINE.match(line):
        return None
    words = shlex.split(line, comments=True)
    while words and (re.fullmatch(r"\w+=\S*", words[0]) or words[0] == "nice"):
        words = words[3:] if words[0] == "nice" and words[1:2] == ["-n"] else words[1:]
    if not words or Path(words[0]).name != "lightning-grendel":
        return None
    return words[1:]


def collect() -> tuple[list[Snippet], list[Snippet]]:
    """The docs' commands and Python snippets, each once, in document order."""
    commands: dict[str, Snippet] = {}
    python: dict[str, Snippet] = {}
    for doc in DOCS:
        name = doc.relative_to(REPO_ROOT)
        for language, first_line, body in _fenced_blocks(doc):
            if language == "python":
                key = "\n".join(line.split("#")[0].rstrip() for line in body.splitlines() if line.split("#")[0].strip())
                python.setdefault(key, Snippet(body)).places.append(f"{name}:{first_line}")
            elif language in ("bash", "sh", "shell"):
                start, pending = first_line, ""
                for number, line in enumerate(body.splitlines(), first_line):
                    start, pending = (start if pending else number), pending + line.removesuffix("\\") + " "
                    if line.endswith("\\"):
                        continue
                    if (args := _command(pending)) is not None:
                        key = shlex.join(args)
                        commands.setdefault(key, Snippet(key)).places.append(f"{name}:{start}")
                    pending = ""
    return list(commands.values()), list(python.values())


COMMANDS, PYTHON = collect()


def test_the_docs_have_commands_and_snippets():
    assert len(COMMANDS) > 10 and len(PYTHON) >= 4  # the extraction still finds them


class Workspace:
    """One folder for every command, and what each recipe's capped fit wrote there."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fitted: dict[str, Path] = {}  # recipe -> its run folder (version_N)

    def run(self, args: list[str], where: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
            env.pop(key, None)
        before = set(self.root.rglob("config.yaml"))
        result = subprocess.run([sys.executable, "-m", "lightning_grendel", *args], cwd=self.root, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (f"{where}: `lightning-grendel {shlex.join(args)}` failed:\n"
                                        f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
        recipe = _recipe(args)
        if args[0] == "fit" and recipe and "--print_config" not in args:
            (config,) = set(self.root.rglob("config.yaml")) - before
            self.fitted[recipe] = config.parent

    def checkpoint(self, recipe: str, where: str) -> Path:
        if recipe not in self.fitted:
            cap = GAUSSIAN_CAP if recipe.startswith("gaussian/") else []
            self.run(["fit", "-c", recipe, *_dataset_args(recipe), *CAPS, *cap], f"{where} (the fit it needs)")
        found = sorted((self.fitted[recipe] / "checkpoints").glob("*.ckpt"), key=lambda p: p.name != "last.ckpt")
        assert found, f"{where}: the capped fit of {recipe} wrote no checkpoint"
        return found[0]

    def substitute(self, args: list[str], where: str) -> list[str]:
        recipe = _recipe(args)
        fitted = recipe or DEFAULT_RECIPE
        out = []
        for flag, value in zip(["", *args[:-1]], args, strict=True):
            value = value.replace("../shared/data/", f"{SHARED_DATA}/")
            if value == "..." and flag == "--data.path":
                value = str(SHARED_DATA / RECIPE_DATA[recipe])
            elif value in ("path/to/last.ckpt", "last.ckpt") and not (self.root / value).exists():
                value = str(self.checkpoint(fitted, where))
            elif value == "path/to/grendel_checkpoint_dir":
                value = str(self.checkpoint("gaussian/grendel_cpu", where))
            elif value == "point_cloud.ply":
                value = str(self.checkpoint(fitted, where).parent.parent / "point_cloud.ply")
            elif value == "capture/" and flag == "--data.path":
                value = str(self.root / "capture")
                if not (self.root / "capture").exists():
                    write_capture_from_colmap(SHARED_DATA / "colmap_blocks", self.root / "capture")
            elif value == "PATH/disease_lp":
                value = str(write_hgcn_folder(self.root / "graphs" / "disease_lp",
                                              generate_disease_like(depth=3, branching=4.0, seed=0)))
            elif "*" in value and (matches := sorted(self.root.glob(value))):  # as bash expands it
                value = str(matches[-1])
            elif flag in ("--ckpt_path", "--ckpt") and not (self.root / value).exists():
                assert (self.root / value).parent.is_dir() or recipe, f"{where}: {value} is neither a path nor known"
                value = str(self.checkpoint(recipe, where))
            assert not re.fullmatch(r"<.*>|PATH.*|path/to/.*", value), f"{where}: unknown placeholder {value!r}"
            out.append(value)
        return out


def _recipe(args: list[str]) -> str | None:
    for flag, value in zip(args, args[1:], strict=False):
        if flag in ("-c", "--config"):
            return value.removesuffix(".yaml").removeprefix("recipes/")
    return None


def _dataset_args(recipe: str) -> list[str]:
    return ["--data.path", str(SHARED_DATA / RECIPE_DATA[recipe])] if recipe in RECIPE_DATA else []


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("docs"))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("snippet", COMMANDS, ids=lambda s: s.places[0])
def test_documented_command_runs(snippet, workspace):
    where = ", ".join(snippet.places)
    for prefix, reason in SKIPPED.items():
        if snippet.code.startswith(prefix):
            pytest.skip(f"{where}: {reason}")
    args = workspace.substitute(shlex.split(snippet.code), where)
    if any(arg.startswith(str(SHARED_DATA)) and not Path(arg).exists() for arg in args):
        pytest.skip(f"{where}: the shared dataset is not present")
    if args[0] in ("fit", "validate", "test", "predict") and "--print_config" not in args and not any(
            arg.startswith("--") and arg.endswith(".help") for arg in args):
        args += CAPS
    elif args[0] == "render":
        args += RENDER_CAP
    if args[0] in ("fit", "validate", "test", "predict", "render") and (_recipe(args) or "").startswith("gaussian/"):
        args += GAUSSIAN_CAP
    workspace.run(args, where)


def _exec(rank: int, world_size: int, code: str) -> None:
    exec(compile(code, "<snippet>", "exec"), {"__name__": "__main__"})


@pytest.mark.timeout(900)
@pytest.mark.parametrize("snippet", PYTHON, ids=lambda s: s.places[0])
def test_documented_python_runs(snippet, tmp_path):
    where = ", ".join(snippet.places)
    code = re.sub(r"max_steps=\d[\d_]*", "max_steps=2", snippet.code.replace("../shared/data/", f"{SHARED_DATA}/"))
    if ranks := RANKS.search(code):
        run_distributed(_exec, int(ranks[1]), code, timeout_s=300)
        return
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_TRAINER_LIMIT_VAL_BATCHES": "1",
           "PL_TRAINER_NUM_SANITY_VAL_STEPS": "0", "PL_TRAINER_ENABLE_PROGRESS_BAR": "0"}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=800)
    assert result.returncode == 0, f"{where}: the snippet failed:\n{code}\n{result.stderr[-4000:]}"

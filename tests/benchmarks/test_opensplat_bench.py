"""The OpenSplat benchmark skips without a binary, rejects a wrong one by flag, and reads PLY headers."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "opensplat.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("opensplat_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=110, env=env)


@pytest.mark.timeout(120)
def test_skips_cleanly_without_a_binary(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OPENSPLAT"}
    env["PATH"] = str(tmp_path)  # no opensplat on PATH
    result = _run(env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("SKIP opensplat: no OpenSplat binary")
    assert "RESULT" not in result.stdout


@pytest.mark.timeout(120)
def test_a_missing_binary_names_the_flag(tmp_path):
    result = _run("--opensplat", str(tmp_path / "nope"), env=dict(os.environ))
    assert result.returncode != 0
    assert "--opensplat" in result.stderr and "nope" in result.stderr


@pytest.mark.timeout(60)
def test_ply_vertex_count_and_step_arithmetic(tmp_path):
    bench = _bench_module()
    ply = tmp_path / "splat.ply"
    header = b"ply\nformat binary_little_endian 1.0\nelement vertex 13454\nproperty float x\nend_header\n"
    ply.write_bytes(header + b"\x00\x01")
    assert bench.ply_vertex_count(ply) == 13454
    ply.write_bytes(b"ply\nformat binary_little_endian 1.0\nend_header\nelement vertex 5\n")
    with pytest.raises(ValueError, match="element vertex"):
        bench.ply_vertex_count(ply)
    assert bench.step_seconds(20, 12.0, 100, 52.0) == pytest.approx(0.5)  # start-up (2 s) cancels
    with pytest.raises(ValueError, match="--long"):
        bench.step_seconds(100, 1.0, 20, 2.0)

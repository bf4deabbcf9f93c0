"""The cost-curve benchmark: its instrumented step trains as the plain one does, its stages add up to the
step, its fits and crossovers are right on known curves, and its quick mode prints every RESULT line."""

from __future__ import annotations

import functools
import importlib.util
import math
import subprocess
import sys

import pytest
import torch

from tests.helpers.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "cost_curves.py"


@functools.cache
def _benchmark_module():
    spec = importlib.util.spec_from_file_location("cost_curves_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(120)
def test_the_instrumented_step_trains_exactly_as_the_plain_step():
    """The split timing (detached leaves, the loss's gradient first, an extra binning call) changes no number."""
    bench = _benchmark_module()
    if bench.load_extension() is None:
        pytest.skip("the C++ rasterizer is not built")
    points, colors, views = bench.scene(3_000, 36, [36])
    cameras, image = views[36]
    split, plain = (bench.StepRunner(points, colors, image, cameras) for _ in range(2))
    for _ in range(2):
        laps = split.step(split=True)
        plain.step(split=False)
    assert set(laps.cpu) == set(bench.STAGES) and all(laps.cpu[stage] >= 0 for stage in ("projection", "binning"))
    for key, value in plain.module.gaussians.items():
        torch.testing.assert_close(split.module.gaussians[key], value, rtol=0, atol=0, msg=key)
    for key in ("grad_sum", "visible_count"):
        assert torch.equal(getattr(split.module.densifier, key), getattr(plain.module.densifier, key)), key


def test_exponents_and_crossovers_on_known_curves():
    bench = _benchmark_module()
    assert bench.exponent([1e3, 1e4, 1e5], [2.0, 200.0, 20_000.0]) == pytest.approx(2.0)

    def point(count: int, fast: float, slow: float) -> object:
        cpu = {**dict.fromkeys(bench.STAGES, 0.001), "adam": fast, "compositing": slow}
        return bench.Point(count, 16, 9, cpu, cpu, sum(cpu.values()), sum(cpu.values()))

    # adam = N/1000 ms, compositing = 10 sqrt(N) ms: equal at N = 1e8, compositing dominating below.
    points = [point(n, n / 1000, 10 * math.sqrt(n)) for n in (1e6, 1e7, 1e9, 1e10)]
    assert [p.dominant() for p in points] == ["compositing", "compositing", "adam", "adam"]
    ((before, after, at),) = bench.crossovers(points, lambda p: p.count)
    assert (before, after) == ("compositing", "adam") and at == pytest.approx(1e8, rel=1e-6)
    fitted = bench.exponents(points, lambda p: p.count)  # the upper half: 1e7, 1e9, 1e10
    assert fitted["adam"] == pytest.approx(1.0) and fitted["compositing"] == pytest.approx(0.5)


@pytest.mark.timeout(300)
def test_cost_curves_quick_stages_add_up_to_the_step(tmp_path):
    plot = tmp_path / "curves.png"
    command = [sys.executable, str(SCRIPT), "--quick", "--plot", str(plot)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    lines = [line.split(" ", 1)[1] for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    values = {key: float(value) for key, value in (line.split("=") for line in lines)}
    bench = _benchmark_module()
    for sweep in ("gaussians", "pixels"):
        for stage in (*bench.STAGES, *bench.GROUPS, "total"):
            assert math.isfinite(values.pop(f"cost_curves.exponent_{sweep}_{stage}")), (sweep, stage)
    ratios = values.pop("cost_curves.stages_over_step_min"), values.pop("cost_curves.stages_over_step_max")
    assert 0.75 <= ratios[0] <= ratios[1] <= 1.33, ratios  # the split timing accounts for the whole step
    rows = [line.strip("|").split("|") for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len(bench.QUICK_GAUSSIANS) + len(bench.QUICK_HEIGHTS)
    for row in rows:
        stages = [float(cell) for cell in row[2 : 2 + len(bench.STAGES)]]
        assert sum(stages) == pytest.approx(float(row[2 + len(bench.STAGES)]), abs=0.1 * len(stages))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

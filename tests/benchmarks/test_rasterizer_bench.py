"""The rasterizer benchmark's alternating measurement times both C++ kernels on the same splats."""

from __future__ import annotations

import importlib.util
import queue

import pytest
import torch

from tests.helpers.paths import REPO_ROOT


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("rasterizer_benchmark", REPO_ROOT / "benchmarks" / "rasterizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(120)
def test_paired_measurement_reports_a_median_per_kernel(tmp_path):
    bench = _benchmark_module()
    if bench.load_extension() is None:
        pytest.skip("the C++ rasterizer is not built")
    scene_file = tmp_path / "scene.pt"
    torch.save(bench.scene(2000, 64), scene_file)
    results = queue.Queue()
    threads = torch.get_num_threads()
    try:
        bench.measure_paired(str(scene_file), 64, 1, 3, results)
    finally:
        torch.set_num_threads(threads)
    scalar_seconds, simd_seconds = results.get_nowait()
    assert list(bench.KERNELS) == ["cpp-scalar", "cpp-simd"]  # the order the tuple is in
    assert scalar_seconds > 0 and simd_seconds > 0
    assert results.empty()

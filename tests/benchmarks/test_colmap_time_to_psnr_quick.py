"""The colmap time-to-PSNR benchmark's quick mode trains both runs, on the kernels each is meant to use.

Its probe must end every run's history at the step training ended on (the table and ``step_breakdown``
read ``history[-1]``, and the quick ``after`` run ends before its first probe): checked on a tiny module.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import lightning as L
import pytest
import torch

from tests.helpers.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "colmap_time_to_psnr.py"


def calls(stdout: str, run: str) -> dict[str, int]:
    """The ``CALLS <run> kernel=count ...`` line of ``run`` as a dict."""
    line = next(line for line in stdout.splitlines() if line.startswith(f"CALLS {run} "))
    return {kernel: int(count) for kernel, count in (pair.split("=") for pair in line.split()[2:])}


@pytest.mark.timeout(120)
def test_colmap_time_to_psnr_quick_reports_both_runs_on_their_kernels(shared_dataset, tmp_path):
    data = shared_dataset("colmap_blocks")
    command = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--data", str(data)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    values = dict(line.split(" ", 1)[1].split("=") for line in result.stdout.splitlines() if line.startswith("RESULT "))
    assert set(values) == {"colmap.before_seconds_to_target", "colmap.after_seconds_to_target",
                           "colmap.time_to_target_speedup", "colmap.projection_sh_fraction"}
    for value in values.values():
        assert value == "not_reached" or float(value) > 0
    before, after = calls(result.stdout, "before"), calls(result.stdout, "after")
    assert before["scalar_rasterizer"] > 0 and before["torch_ssim_loss"] > 0
    assert before["simd_rasterizer"] == 0 and before["fused_ssim_loss"] == 0
    assert after["simd_rasterizer"] > 0 and after["fused_ssim_loss"] > 0
    assert after["scalar_rasterizer"] == 0 and after["torch_ssim_loss"] == 0
    assert before["torch_projection"] > 0 and before["fused_projection"] == 0
    assert after["fused_projection"] > 0 and after["torch_projection"] == 0
    assert before["default_adam"] > 0 and before["fused_adam"] == 0
    assert after["fused_adam"] > 0 and after["default_adam"] == 0
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| before ", "| after "))]
    assert len(rows) == 2


class GreyImages(L.LightningModule):
    """One grey level, trained towards 0.5; ``render_views`` paints every camera's image in it."""

    def __init__(self) -> None:
        super().__init__()
        self.level = torch.nn.Parameter(torch.tensor(0.1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self.level - 0.5) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def render_views(self, cameras) -> torch.Tensor:
        return self.level.detach().expand(len(cameras), cameras.height, cameras.width, 3).clone()


def _script_probe(monkeypatch: pytest.MonkeyPatch) -> type:
    """The probe class the script trains with (it imports its siblings by name, as when run as a script)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("colmap_time_to_psnr_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.PSNRProbe


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("every_s", "target", "steps"), [
    (1e9, math.inf, [4]),  # ended at max_steps between probes: one probe, at the end
    (0.0, math.inf, [1, 2, 3, 4]),  # a probe at every step, the last one included: none added
    (0.0, -math.inf, [1]),  # stopped at the target by the first probe: none added after it
])
def test_probe_history_ends_at_the_last_trained_step(monkeypatch, every_s, target, steps):
    probe = _script_probe(monkeypatch)(
        {"image": torch.zeros(2, 4, 6, 3), "world_to_camera": torch.eye(4).expand(2, 4, 4),
         "intrinsics": torch.eye(3).expand(2, 3, 3)}, every_s, target, budget_s=math.inf)
    module = GreyImages()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=5, logger=False, callbacks=[probe],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(torch.zeros(100, 1)))
    assert [step for step, *_ in probe.history] == steps
    assert steps[-1] == trainer.global_step - 1  # steps count from the untimed first one
    level = float(module.level.detach())
    assert probe.history[-1][2] == pytest.approx(-10 * math.log10(level**2), rel=1e-5)  # the final model's PSNR

"""The fault-injection benchmark's quick mode: a rank killed inside a save recovers from the previous
checkpoint, a flipped checkpoint bit, a flipped input bit and a NaN pose each end in a clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.paths import REPO_ROOT


@pytest.mark.timeout(400)
def test_faults_quick_has_no_hang_no_silent_corruption_and_no_unclear_error(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "faults.py"), "--quick"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=360, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    values = {key: int(value) for key, value in
              (line.split(" ", 1)[1].split("=") for line in result.stdout.splitlines() if line.startswith("RESULT "))}
    assert values["faults.trials"] == 4
    assert values["faults.silent"] == 0 and values["faults.hangs"] == 0 and values["faults.unclear_error"] == 0
    assert values["faults.recovered"] + values["faults.clear_error"] == 4
    assert "| kill_during_save | 1 |" in result.stdout

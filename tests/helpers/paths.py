"""Where the repository and the shared datasets are; a missing dataset skips the test that needs it."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def shared_dataset_path(name: str) -> Path:
    """Path of a dataset under ``../shared/data``; skips the test with a reason when it is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {path} is not present")
    return path

"""Shared test fixtures: paths to the shared data and a clean distributed environment per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

_DIST_ENV_KEYS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK")

torch.set_num_threads(1)


def shared_dataset(name: str) -> Path:
    """Path of a dataset under ``../shared/data``; skips the test with a reason when it is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {path} is not present")
    return path


@pytest.fixture(autouse=True)
def _restore_distributed_env():
    """Lightning's launchers leak rank variables into the parent; restore them after every test."""
    saved = {key: os.environ.get(key) for key in _DIST_ENV_KEYS}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

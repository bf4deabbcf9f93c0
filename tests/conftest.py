"""Shared test fixtures: paths to the shared data and a clean distributed environment per test."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers.paths import shared_dataset_path

_DIST_ENV_KEYS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK")

torch.set_num_threads(1)
os.environ["LIGHTNING_GRENDEL_LIVE_VIEWER"] = "off"  # recipes that enable the live view serve no page in tests


@pytest.fixture(scope="session")
def shared_dataset() -> Callable[[str], Path]:
    """``shared_dataset(name)``: the path of ``../shared/data/<name>``, skipping the test when it is absent."""
    return shared_dataset_path


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

"""The shared process-group plumbing: ranks leave the group together once a run is done."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch.distributed as dist

from lightning_grendel._process_group import _LeaveTogetherLauncher, init_backend, leave_process_group
from lightning_grendel.splatting.grendel import GrendelStrategy


@pytest.mark.timeout(60)
def test_leave_process_group_destroys_the_default_group(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=30))
    leave_process_group()
    assert not dist.is_initialized()
    leave_process_group()  # a no-op without a group


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_spawned_workers_use_the_launcher_that_leaves_together(start_method):
    strategy = GrendelStrategy(start_method=start_method)
    strategy.cluster_environment = object()
    strategy._configure_launcher()
    assert isinstance(strategy.launcher, _LeaveTogetherLauncher)


def test_nccl_groups_get_gloo_beside_them_for_cpu_tensors():
    assert init_backend("nccl") == "cpu:gloo,cuda:nccl"  # an NCCL-only group refuses CPU collectives
    assert init_backend("gloo") == "gloo"
    assert init_backend("cpu:gloo,cuda:nccl") == "cpu:gloo,cuda:nccl"

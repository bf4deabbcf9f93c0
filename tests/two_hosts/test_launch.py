"""The two-host helper itself: ranks on both hosts with distinct host names, private shm, clean teardown."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest
import torch
import torch.distributed as dist

from lightning_grendel._two_hosts import TwoHosts


def _where(rank: int, world: int) -> dict:
    names = [None] * world
    dist.all_gather_object(names, socket.gethostname())
    token = torch.tensor([rank * 10.0])
    dist.all_reduce(token)
    return {"hostname": socket.gethostname(), "all": names, "sum": token, "shm": sorted(os.listdir("/dev/shm")),
            "node": os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", ""))}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("launcher", ["torchrun", "env"])
def test_ranks_start_on_two_hosts(two_hosts: TwoHosts, launcher: str):
    results = two_hosts.run("tests.two_hosts.test_launch:_where", (1, 2), launcher=launcher, timeout_s=60)
    assert [r["hostname"] for r in results] == [two_hosts.hostnames[0]] + [two_hosts.hostnames[1]] * 2
    assert results[0]["all"] == [r["hostname"] for r in results]
    assert all(float(r["sum"]) == 30.0 for r in results)
    assert all(r["shm"] == [] for r in results)  # each host's own, empty /dev/shm
    sent = two_hosts.link_bytes()
    assert min(sent) > 0  # the ranks talked over the veth pair


def _fail_on_rank_one(rank: int, world: int) -> None:
    if rank == 1:
        raise RuntimeError("rank one fails on purpose")
    dist.barrier()


def _hang(rank: int, world: int) -> None:
    if rank == 1:
        with open("/dev/shm/left_by_a_hung_rank", "w") as handle:  # on host 1's own /dev/shm
            handle.write("x")
    time.sleep(600)  # every rank: no collective times out first, the run's deadline kills them


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("target", "message"), [("_fail_on_rank_one", "rank one fails on purpose"),
                                                 ("_hang", "two-host run timed out")])
def test_a_failing_or_hung_rank_fails_the_run_and_teardown_leaves_nothing(two_hosts_reason, target, message):
    if two_hosts_reason is not None:
        pytest.skip(f"two hosts need network namespaces: {two_hosts_reason}")
    hosts = TwoHosts()
    try:
        with pytest.raises(AssertionError, match=message):
            hosts.run(f"tests.two_hosts.test_launch:{target}", (1, 1), launcher="env", timeout_s=5)
    finally:
        if target == "_hang":  # the file a killed rank left is reported, and removed anyway
            with pytest.raises(AssertionError, match="left_by_a_hung_rank"):
                hosts.close()
        else:
            hosts.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in hosts.namespaces)
    links = subprocess.run(["ip", "link", "show"], capture_output=True, text=True).stdout
    assert not any(name in links for name in hosts.interfaces)
    assert not any(os.path.exists(d) for d in hosts.shm_dirs)

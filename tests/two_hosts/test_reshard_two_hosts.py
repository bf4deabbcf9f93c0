"""reshard() across two hosts: shared memory inside a host, gloo across it, one copy per host for a broadcast.

Which transport carried each pair is read from outside the code under test: the bytes each host's veth
interface sent (the kernel's counter) and the arena files each host's own ``/dev/shm`` holds.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from lightning_grendel._two_hosts import TwoHosts
from lightning_grendel.resharding import EXECUTORS, Mesh, reshard
from lightning_grendel.resharding.fanout import fanout
from lightning_grendel.resharding.reshard import _world_state

ROWS, COLS = 256, 1024  # 1 MiB of float32
PAYLOAD = ROWS * COLS * 4


def test_fanout_sends_one_copy_into_each_host():
    hosts = ["a", "a", "b", "b", "b", "c", "d"]
    route = fanout((0, 1, 2, 3, 4, 5, 6), hosts)
    assert route.local == {0: (1,), 2: (3, 4), 5: (), 6: ()}
    assert route.parent == {2: 0, 5: 0, 6: 2}  # binomial over the leaders [0, 2, 5, 6]
    assert route.children == {0: (2, 5), 2: (6,), 5: (), 6: ()}
    assert fanout((3, 1), ["x"] * 4) is None
    wide = fanout(tuple(range(9)), [str(r) for r in range(9)])
    received = {0}
    for rank in range(1, 9):  # every leader hears exactly once, from a leader that already holds it
        assert wide.parent[rank] < rank and wide.parent[rank] in received
        received.add(rank)


def _tx_bytes() -> int:
    with open(f"/sys/class/net/{os.environ['GLOO_SOCKET_IFNAME']}/statistics/tx_bytes") as handle:
        return int(handle.read())


def _timed_link_bytes(fn) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Run ``fn`` between barriers; return its result and the bytes every rank's host sent meanwhile."""
    dist.barrier()
    before = _tx_bytes()
    result = fn()
    dist.barrier()
    sent = torch.tensor([_tx_bytes() - before], dtype=torch.int64)
    every = [torch.zeros_like(sent) for _ in range(dist.get_world_size())]
    dist.all_gather(every, sent)
    return result, torch.cat(every)


def _reshard_across(rank: int, world: int) -> dict:
    full = torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS)
    src, dst = Mesh([0], (1, 1)), Mesh([1, 2, 3], (1, 3))
    mine = full if rank == 0 else None
    report: dict = {"bytes": {}, "ok": True}
    for executor in EXECUTORS:
        out, sent = _timed_link_bytes(lambda e=executor: reshard(mine, src, "RR", dst, "RR", e, shape=full.shape,
                                                                 dtype=full.dtype, transport="auto"))
        report["ok"] &= rank == 0 or torch.equal(out, full)
        report["bytes"][executor] = sent
    # 2 rows over 2 hosts: the first half goes 0 -> 1 inside host 0, the second 0 -> 2 across.
    rows_dst = Mesh([1, 2], (2, 1))
    out, sent = _timed_link_bytes(lambda: reshard(mine, src, "RR", rows_dst, "S0R", "send_recv", shape=full.shape,
                                                  dtype=full.dtype, transport="auto"))
    report["ok"] &= rank not in (1, 2) or torch.equal(out, full[:ROWS // 2] if rank == 1 else full[ROWS // 2:])
    report["bytes"]["rows"] = sent
    report["shm"] = sorted(name.rsplit("_rank", 1)[1] for name in os.listdir("/dev/shm"))
    try:
        reshard(mine, src, "RR", dst, "RR", shape=full.shape, dtype=full.dtype, transport="shm")
        report["shm_error"] = ""
    except ValueError as error:
        report["shm_error"] = str(error)
    dist.barrier()
    _world_state().shared_memory().close()
    return report


@pytest.mark.timeout(180)
def test_auto_uses_shared_memory_inside_a_host_and_gloo_across(two_hosts: TwoHosts):
    reports = two_hosts.run("tests.two_hosts.test_reshard_two_hosts:_reshard_across", (2, 2), timeout_s=90)
    assert all(r["ok"] for r in reports), "every destination rank holds the full tensor"
    host0 = {name: int(sent[0]) for name, sent in reports[0]["bytes"].items()}  # rank 0's host's tx counter
    slack = PAYLOAD // 5  # TCP/IP headers and gloo's small messages
    # Pairs 0->1 (same host) never touch the link; 0->2 and 0->3 cross it once each with send_recv...
    assert 2 * PAYLOAD <= host0["send_recv"] < 2 * PAYLOAD + slack, host0
    # ...while a broadcast enters host 1 once, and rank 2 hands it to rank 3 inside host 1.
    assert PAYLOAD <= host0["broadcast"] < PAYLOAD + slack, host0
    # allgather: 0 sends each of 1, 2, 3 a third; 2 and 3 gather inside host 1, 1 gets theirs from across.
    assert host0["allgather"] < 2 * PAYLOAD, host0
    assert PAYLOAD // 2 <= host0["rows"] < PAYLOAD // 2 + slack, host0
    # The arenas that exist are on the hosts that used them: rank 0 wrote for rank 1 (transfer), rank 2 for
    # rank 3 (gather, as the leader of host 1); ranks 1 and 3 only read.
    assert "0_transfer" in reports[0]["shm"] and "0_transfer" not in reports[2]["shm"]
    assert "2_gather" in reports[2]["shm"] and "2_gather" not in reports[0]["shm"]
    assert all(r["shm_error"].startswith("transport='shm' needs") for r in reports)
    assert two_hosts.hostnames[0] in reports[0]["shm_error"] and two_hosts.hostnames[1] in reports[0]["shm_error"]


def _host_keys(rank: int, world: int) -> list[str]:
    arenas = _world_state().shared_memory()
    keys = list(arenas.hosts)
    full = torch.ones(8, 8)
    out = reshard(full if rank == 0 else None, Mesh([0]), "RR", Mesh([1, 2, 3], (1, 3)), "RR", shape=(8, 8),
                  dtype=torch.float32)
    assert rank == 0 or torch.equal(out, full)
    dist.barrier()
    arenas.close()
    return keys


@pytest.mark.timeout(120)
def test_a_shared_host_name_alone_does_not_make_one_host(two_hosts_reason):
    """Two machines may carry one host name: only a shared /dev/shm makes ranks share memory."""
    if two_hosts_reason is not None:
        pytest.skip(f"two hosts need network namespaces: {two_hosts_reason}")
    with TwoHosts(hostnames=("twin", "twin")) as hosts:
        keys = hosts.run("tests.two_hosts.test_reshard_two_hosts:_host_keys", (2, 2), launcher="env", timeout_s=60)
    assert all(k == keys[0] for k in keys)
    assert keys[0][0] == keys[0][1] != keys[0][2] == keys[0][3]

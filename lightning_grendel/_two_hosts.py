"""Two "hosts" on one machine: a network namespace each, joined by a veth pair, ranks started as a cluster does.

Each host gets its own network namespace (traffic between hosts crosses only the veth pair created here,
with addresses chosen here), and every process started on it its own UTS namespace (a distinct host
name) and mount namespace in which ``/dev/shm`` is a per-host directory: shared memory is visible inside
a host and not across, as on two machines. Ranks are started per host with ``torchrun --nnodes 2
--node-rank i --master-addr <host 0's address>`` (or, with ``launcher="env"``, one process per rank with
the ``MASTER_ADDR``/``NODE_RANK``/``WORLD_SIZE`` environment Lightning's cluster environment reads).

Everything is removed in :meth:`TwoHosts.close`, also after a failure or a timeout: the processes in
both namespaces are killed, the namespaces deleted (which deletes the veth pair) and the per-host
``/dev/shm`` directories checked for leftovers and removed. Needs root, ``ip`` and ``unshare``.

Also the entry point of every rank: ``python -m lightning_grendel._two_hosts <module:function> <out dir>
<json kwargs> <timeout>`` joins the gloo group from the environment, calls ``function(rank, world, **kwargs)``
and saves its result (tensors, numbers, strings, lists and dicts of those) to ``<out dir>/rank<r>.pt``.
The target module is imported from the directory the caller runs in (the repository root for the
tests and benchmarks). A development tool shared by ``tests/two_hosts`` and ``benchmarks/two_hosts.py``,
not part of the library's API.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

PACKAGE_PARENT = Path(__file__).resolve().parents[1]  # so the ranks import this checkout of the package
SUBNET = "10.213.7"  # private to the namespaces made here: nothing else can see these addresses
MASTER_PORT = 29500  # free by construction: host 0's network namespace is new and holds only our ranks
_COUNTER = [0]
# Inside a fresh UTS + mount namespace: name the host, give it its own /dev/shm, then run the command.
_HOST_SHELL = 'hostname "$1" && mount --bind "$2" /dev/shm && shift 2 && exec "$@"'


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable_reason() -> str | None:
    """Why two hosts cannot be made here (None when they can): root, ``ip``, ``unshare``, a test namespace."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"lgprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:
        shell = subprocess.run(["ip", "netns", "exec", probe, "unshare", "--uts", "--mount", "true"],
                               capture_output=True, text=True, timeout=30)
        if shell.returncode != 0:
            return f"cannot create UTS/mount namespaces: {shell.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


class TwoHosts:
    """Two namespaces joined by a veth pair; start ranks on them, shape the link, read its byte counters.

    ``hostnames`` overrides the host names (e.g. the same name twice, to check that a shared host name
    alone does not make two hosts share memory).
    """

    def __init__(self, hostnames: Sequence[str] | None = None) -> None:
        _COUNTER[0] += 1
        tag = f"{os.getpid()}x{_COUNTER[0]}"
        self.namespaces = [f"lg2h{tag}h{i}" for i in range(2)]
        self.interfaces = [f"lg{tag}{'ab'[i]}"[:15] for i in range(2)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(2)]
        self.hostnames = list(hostnames) if hostnames is not None else [f"lg-{tag}-host{i}" for i in range(2)]
        self.shm_dirs: list[Path] = []
        self._processes: list[subprocess.Popen] = []
        self._made: list[str] = []
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        for namespace in self.namespaces:
            _ip("netns", "add", namespace)
            self._made.append(namespace)
        _ip("link", "add", self.interfaces[0], "type", "veth", "peer", "name", self.interfaces[1])
        for namespace, interface, address in zip(self.namespaces, self.interfaces, self.addresses, strict=True):
            _ip("link", "set", interface, "netns", namespace)  # from here on it exists only inside
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", interface)
            _ip("-n", namespace, "link", "set", interface, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            self.shm_dirs.append(Path(tempfile.mkdtemp(prefix=f"lg2h{namespace}_", dir="/dev/shm")))

    def __enter__(self) -> TwoHosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the link ----------------------------------------------------------------------------------

    def shape(self, rate_mbit: float, burst_kib: int = 256, delay_ms: float = 0.0) -> None:
        """Limit both directions of the link with ``tbf`` (rate, bucket), after an optional ``netem`` delay."""
        for namespace, interface in zip(self.namespaces, self.interfaces, strict=True):
            base = ["netns", "exec", namespace, "tc", "qdisc", "replace", "dev", interface]
            tbf = ["tbf", "rate", f"{rate_mbit}mbit", "burst", f"{burst_kib}kb", "latency", "100ms"]
            if delay_ms > 0:
                _ip(*base, "root", "handle", "1:", "netem", "delay", f"{delay_ms}ms")
                _ip(*base, "parent", "1:1", "handle", "10:", *tbf)
            else:
                _ip(*base, "root", *tbf)

    def link_bytes(self) -> list[int]:
        """Bytes each host has sent over the veth link so far (its interface's tx counter)."""
        sent = []
        for namespace, interface in zip(self.namespaces, self.interfaces, strict=True):
            stats = json.loads(_ip("-n", namespace, "-j", "-s", "link", "show", "dev", interface).stdout)
            sent.append(int(stats[0]["stats64"]["tx"]["bytes"]))
        return sent

    def shm_files(self) -> list[list[str]]:
        """What each host's ``/dev/shm`` holds now."""
        return [sorted(os.listdir(d)) for d in self.shm_dirs]

    # --- processes ---------------------------------------------------------------------------------

    def popen(self, host: int, argv: Sequence[str], env: dict[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` on ``host`` (its own process group, so a timeout can kill it and its children)."""
        wrapped = ["ip", "netns", "exec", self.namespaces[host], "unshare", "--uts", "--mount", "--",
                   "sh", "-c", _HOST_SHELL, "host", self.hostnames[host], str(self.shm_dirs[host]), *argv]
        full_env = {**os.environ, **(env or {})}
        process = subprocess.Popen(wrapped, env=full_env, start_new_session=True, **kwargs)
        self._processes.append(process)
        return process

    def host_env(self, host: int) -> dict[str, str]:
        """What every rank on ``host`` needs: one thread, gloo on the veth, the caller's modules importable."""
        return {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "GLOO_SOCKET_IFNAME": self.interfaces[host],
                "PYTHONPATH": os.pathsep.join([os.getcwd(), str(PACKAGE_PARENT)]),
                "MASTER_ADDR": self.addresses[0], "MASTER_PORT": str(MASTER_PORT)}

    def run(self, target: str, ranks_per_host: Sequence[int] = (2, 2), *, launcher: str = "torchrun",
            timeout_s: float = 120.0, **kwargs: Any) -> list[Any]:
        """Run ``target`` (``"module:function"``) on every rank; return each rank's result, in rank order.

        Host 0 holds ranks ``0..n0-1``, host 1 the next ``n1``. Any rank's exception, or a run past
        ``timeout_s`` (every process is then killed), fails the call with the ranks' output.
        """
        if launcher not in ("torchrun", "env"):
            raise ValueError(f"unknown launcher {launcher!r}; choose torchrun or env")
        world = sum(ranks_per_host)
        with tempfile.TemporaryDirectory(prefix="lg2h_out_") as out:
            args = [target, out, json.dumps(kwargs), str(timeout_s)]
            entry = [sys.executable, "-m", "lightning_grendel._two_hosts", *args]
            started: list[tuple[str, subprocess.Popen]] = []
            for host, count in enumerate(ranks_per_host):
                env = self.host_env(host)
                if launcher == "torchrun":
                    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
                            str(count), "--node-rank", str(host), "--master-addr", self.addresses[0],
                            "--master-port", str(MASTER_PORT), "--max-restarts", "0", "--monitor-interval", "0.2",
                            "-m", "lightning_grendel._two_hosts", *args]
                    log = open(os.path.join(out, f"host{host}.log"), "w")  # noqa: SIM115 - closed below
                    started.append((log.name, self.popen(host, argv, env, stdout=log, stderr=subprocess.STDOUT)))
                    log.close()
                    continue
                first = sum(ranks_per_host[:host])
                for local in range(count):
                    rank_env = {**env, "RANK": str(first + local), "LOCAL_RANK": str(local), "NODE_RANK": str(host),
                                "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(count)}
                    log = open(os.path.join(out, f"rank{first + local}.log"), "w")  # noqa: SIM115
                    started.append((log.name, self.popen(host, entry, rank_env, stdout=log,
                                                         stderr=subprocess.STDOUT)))
                    log.close()
            self._wait(started, timeout_s + 30)
            return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(world)]

    def _wait(self, started: list[tuple[str, subprocess.Popen]], deadline_s: float) -> None:
        start = time.monotonic()
        while any(p.poll() is None for _, p in started):
            failed = [p for _, p in started if p.returncode not in (None, 0)]
            if failed or time.monotonic() - start > deadline_s:
                time.sleep(2.0 if failed else 0.0)  # let the peers of a failed rank report their own error
                for _, process in started:
                    _kill_group(process)
                break
            time.sleep(0.1)
        if all(p.returncode == 0 for _, p in started):
            return
        logs = "\n".join(f"--- {Path(name).name} (exit {p.returncode}) ---\n{Path(name).read_text()[-4000:]}"
                         for name, p in started)
        late = time.monotonic() - start > deadline_s
        raise AssertionError(("two-host run timed out\n" if late else "two-host run failed\n") + logs)

    def close(self) -> None:
        """Kill what runs on the hosts, delete the namespaces (and so the veth pair), remove the shm dirs.

        Raises ``AssertionError`` when a host's ``/dev/shm`` still held files (a shared-memory leak),
        after removing everything.
        """
        for process in self._processes:
            _kill_group(process)
        for namespace in self._made:
            pids = _ip("netns", "pids", namespace, check=False).stdout.split()
            for pid in pids:  # only our processes can be in a namespace we created
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for namespace in self._made:
            _ip("netns", "del", namespace, check=False)
        self._made = []
        leaks = {str(d): os.listdir(d) for d in self.shm_dirs if d.is_dir() and os.listdir(d)}
        for directory in self.shm_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        if leaks:
            raise AssertionError(f"shared-memory files left behind on the hosts: {leaks}")


def _kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _save(result: Any, path: str) -> None:
    partial = f"{path}.partial"
    torch.save(result, partial)
    os.replace(partial, path)  # the parent never reads a half-written result


def _rank_main(target: str, out: str, kwargs_json: str, timeout_s: str) -> None:
    import torch.distributed as dist

    from lightning_grendel._process_group import leave_process_group

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=float(timeout_s)))
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    try:
        result = function(rank, world, **json.loads(kwargs_json))
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # no barrier to wait on: the peers see the failure through their own timeouts or errors
    _save(result, os.path.join(out, f"rank{rank}.pt"))
    leave_process_group()


if __name__ == "__main__":
    _rank_main(*sys.argv[1:])

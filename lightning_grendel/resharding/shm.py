"""Shared-memory transport for ranks on one host: a payload is written once and read by each receiver.

Over loopback TCP every receiver's copy costs the same CPU whichever rank forwards it (each hop copies
the bytes into and out of the kernel), so a broadcast cannot beat separate sends on one machine. Through
shared memory a broadcast is one write plus one read per receiver while ``send_recv`` still writes once
per receiver: the saving the broadcast-based method is about (NCCL gets the same effect inside a node
from its shared-memory and peer-to-peer transports). Payloads go into arena files in ``/dev/shm``,
laid out per plan by :func:`arena_layout`; only tiny gloo messages carry the signals.

Each rank has two arenas: ``transfer`` for what it sends (``Send``, ``Broadcast``) and ``gather`` for
its all-gather contributions. A pipeline stage sends on its outbox thread while its main thread
receives (and, with the ``allgather`` executor, contributes): each thread then writes only its own arena.
"""

from __future__ import annotations

import mmap
import os
import socket
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.distributed as dist

from lightning_grendel.resharding.fanout import fanout, ranks_by_host
from lightning_grendel.resharding.plan import Broadcast, Gather, ReshardPlan, Send

SHM_DIRECTORY = "/dev/shm"
_ALIGN = 64  # cache-line aligned slots; also a multiple of every dtype's item size
_HOSTNAME_BYTES = 256
_MIN_ARENA = 4096  # a zero-length file cannot be mapped
ARENA_KINDS = ("transfer", "gather")
Transport = Literal["auto", "dist", "shm"]
TRANSPORTS: tuple[Transport, ...] = get_args(Transport)


def arena_kind(op: Send | Broadcast | Gather) -> str:
    """The arena an operation's payload is written to (see the module docstring)."""
    return "gather" if isinstance(op, Gather) else "transfer"


@dataclass(frozen=True)
class ArenaLayout:
    """Where each writer puts each payload of one plan, and who reads what it wrote."""

    offsets: dict[tuple[int, int], int]  # (op index, writer rank) -> byte offset in its arena of the op's kind
    sizes: dict[tuple[int, str], int]  # (writer rank, arena kind) -> bytes that arena needs for this plan
    readers: dict[int, frozenset[int]]  # writer rank -> the other ranks that read from its arenas
    kinds: dict[tuple[int, int], str]  # (op index, writer rank) -> the arena kind it writes that payload to


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def op_ranks(op: Send | Broadcast | Gather) -> tuple[int, ...]:
    return (op.sender, op.receiver) if isinstance(op, Send) else op.ranks


def _writes(op: Send | Broadcast | Gather, hosts: Sequence[str] | None) -> list[tuple[int, str, tuple[int, ...]]]:
    """(writer, arena kind, readers) of one operation; with ``hosts``, only what stays inside a host."""
    if hosts is not None and len({hosts[r] for r in op_ranks(op)}) > 1:
        route = fanout(op.ranks, hosts) if isinstance(op, Broadcast) else None
        if route is None:
            return []  # a Send or Gather across hosts goes through torch.distributed
        # A leader other than the sender is a destination: it writes its gather arena, as receivers do.
        return [(leader, "transfer" if leader == op.ranks[0] else "gather", members)
                for leader, members in route.local.items() if members]
    kind = arena_kind(op)
    if isinstance(op, Send):
        return [(op.sender, kind, (op.receiver,))]
    if isinstance(op, Broadcast):
        return [(op.ranks[0], kind, op.ranks[1:])]
    return [(member, kind, tuple(r for r in op.ranks if r != member)) for member in op.ranks]


def arena_layout(plan: ReshardPlan, hosts: Sequence[str] | None = None) -> ArenaLayout:
    """Give every payload its own slot, so nothing is overwritten before the end of the plan.

    A ``Send`` and a ``Broadcast`` are written by their sender; a ``Gather`` by each of its members (its
    contribution), read by every other member. Given each rank's host, operations across hosts get
    no slot, except the leaders' slots of a broadcast that spans hosts (see ``fanout.py``).
    """
    offsets: dict[tuple[int, int], int] = {}
    sizes: dict[tuple[int, str], int] = {}
    readers: dict[int, set[int]] = {}
    kinds: dict[tuple[int, int], str] = {}
    for index, op in enumerate(plan.ops):
        nbytes = _aligned(plan.op_bytes(op))
        for writer, kind, reads in _writes(op, hosts):
            arena = (writer, kind)
            offsets[(index, writer)] = sizes.get(arena, 0)
            kinds[(index, writer)] = kind
            sizes[arena] = sizes.get(arena, 0) + nbytes
            readers.setdefault(writer, set()).update(reads)
    return ArenaLayout(offsets, sizes, {w: frozenset(r) for w, r in readers.items()}, kinds)


def _map(path: str, nbytes: int, create: bool) -> tuple[mmap.mmap, torch.Tensor]:
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            os.ftruncate(fd, nbytes)
        else:
            nbytes = os.fstat(fd).st_size  # map all the writer has grown it to
        mapping = mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)
    return mapping, torch.frombuffer(mapping, dtype=torch.uint8)


def _unlink_all(paths: Iterable[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class SharedMemoryArenas:
    """This rank's arenas (grown on demand) and read mappings of the arenas of the ranks on its host.

    Collective over the default process group when created: ranks exchange host names and agree on a
    session id, so several jobs on one machine never share files. The arena files are removed by
    :meth:`close`, or when this object is garbage-collected or the process exits.
    """

    def __init__(self, directory: str = SHM_DIRECTORY) -> None:
        if not dist.is_initialized():
            raise RuntimeError("SharedMemoryArenas needs an initialised torch.distributed process group")
        self.rank = dist.get_rank()
        session = torch.zeros(1, dtype=torch.int64)
        if self.rank == 0:
            session[0] = int.from_bytes(os.urandom(7), "little")
        dist.broadcast(session, src=0)
        self._prefix = os.path.join(directory, f"lightning_grendel_{int(session):x}_rank")
        self.hosts = _host_keys(self._prefix, self.rank)
        self._own: dict[str, tuple[mmap.mmap, torch.Tensor]] = {}
        self._peers: dict[tuple[int, str], tuple[mmap.mmap, torch.Tensor]] = {}
        paths = [self.path(self.rank, kind) for kind in ARENA_KINDS]
        self._finalizer = weakref.finalize(self, _unlink_all, paths)

    @staticmethod
    def available(directory: str = SHM_DIRECTORY) -> bool:
        return os.path.isdir(directory) and os.access(directory, os.W_OK)

    def one_host(self, ranks: Iterable[int]) -> bool:
        """True when all of ``ranks`` share one host (the same answer on every rank)."""
        return len({self.hosts[r] for r in ranks}) <= 1

    def path(self, rank: int, kind: str) -> str:
        return f"{self._prefix}{rank}_{kind}"

    def writable(self, kind: str, nbytes: int) -> torch.Tensor:
        """This rank's ``kind`` arena, at least ``nbytes`` long (grown before any peer is told to read it)."""
        own = self._own.get(kind)
        if own is None or own[1].numel() < nbytes:
            grown = max(nbytes, _MIN_ARENA, 2 * own[1].numel() if own is not None else 0)
            own = self._own[kind] = _map(self.path(self.rank, kind), grown, create=True)
        return own[1]

    def readable(self, writer: int, kind: str, nbytes: int) -> torch.Tensor:
        """``writer``'s ``kind`` arena, mapped to at least ``nbytes``; call only after ``writer`` signalled."""
        if writer == self.rank:
            return self.writable(kind, nbytes)
        mapped = self._peers.get((writer, kind))
        if mapped is None or mapped[1].numel() < nbytes:
            mapped = self._peers[(writer, kind)] = _map(self.path(writer, kind), nbytes, create=False)
            if mapped[1].numel() < nbytes:
                raise RuntimeError(f"rank {writer}'s {kind} arena holds {mapped[1].numel()} bytes, fewer than "
                                   f"the {nbytes} the plan needs")
        return mapped[1]

    def close(self) -> None:
        """Remove this rank's arena files (peers' existing mappings stay valid)."""
        self._finalizer()


def _host_keys(prefix: str, rank: int) -> list[str]:
    """Per rank, ``<host name>#<lowest rank whose probe file it reads>``: equal keys mean one host.

    A host name alone misleads both ways: containers on two machines may share a name (shared memory
    would then be used where it cannot work), and a UTS namespace renames part of one machine. The
    transport works exactly where the files are shared, so every rank writes a probe file with a random
    token and looks for everyone else's; ranks whose ``/dev/shm`` differs get different keys.
    """
    tokens = torch.zeros(dist.get_world_size(), dtype=torch.int64)
    tokens[rank] = int.from_bytes(os.urandom(7), "little")
    dist.all_reduce(tokens)
    probe = f"{prefix}{rank}_probe"
    with open(probe, "wb") as handle:
        handle.write(int(tokens[rank]).to_bytes(8, "little"))
    try:
        dist.barrier()  # every probe is written
        seen = min(r for r in range(len(tokens)) if _reads_token(f"{prefix}{r}_probe", int(tokens[r])))
        dist.barrier()  # every rank has looked
    finally:
        _unlink_all([probe])
    lowest = torch.zeros(len(tokens), dtype=torch.int64)
    lowest[rank] = seen
    dist.all_reduce(lowest)
    return [f"{name}#{int(key)}" for name, key in zip(_all_hostnames(), lowest, strict=True)]


def _reads_token(path: str, token: int) -> bool:
    try:
        with open(path, "rb") as handle:
            return int.from_bytes(handle.read(8), "little") == token
    except FileNotFoundError:
        return False


def _all_hostnames() -> list[str]:
    """Host name of every rank, exchanged as fixed-size byte tensors (no pickling)."""
    name = socket.gethostname().encode()[:_HOSTNAME_BYTES]
    mine = torch.zeros(_HOSTNAME_BYTES, dtype=torch.uint8)
    mine[:len(name)] = torch.tensor(list(name), dtype=torch.uint8)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [bytes(t.tolist()).rstrip(b"\0").decode(errors="replace") for t in gathered]


def check_transport(transport: str) -> None:
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; choose one of {TRANSPORTS}")


def create_arenas() -> SharedMemoryArenas | None:
    """Collective over the default group: arenas if every rank can use shared memory, else None.

    Shared memory needs the gloo backend (CPU tensors) and a writable ``/dev/shm`` on every rank.
    """
    if dist.get_backend() != "gloo":
        return None
    usable = torch.tensor([int(SharedMemoryArenas.available())])
    dist.all_reduce(usable, op=dist.ReduceOp.MIN)  # every rank decides alike
    return SharedMemoryArenas() if usable.item() else None


def arenas_for(transport: str, arenas: SharedMemoryArenas | None, ranks: Iterable[int]) -> SharedMemoryArenas | None:
    """The arenas transfers among ``ranks`` use under ``transport``, or None for torch.distributed only.

    ``auto`` takes them whenever they exist: the executor then picks per operation, shared memory for
    ranks on one host and torch.distributed across hosts. ``shm`` needs every rank on one host, else
    it is a ``ValueError`` naming the hosts.
    """
    if transport == "dist":
        return None
    ranks = sorted(set(ranks))
    if transport == "shm" and (arenas is None or not arenas.one_host(ranks)):
        where = ""
        if arenas is not None:
            by_host = ranks_by_host(ranks, arenas.hosts)
            where = "; ranks by host: " + ", ".join(f"{host}: {members}" for host, members in by_host.items())
        raise ValueError("transport='shm' needs the gloo backend (CPU tensors), a writable /dev/shm and every "
                         f"rank of both meshes on one host{where}. Use transport='auto' (shared memory inside a "
                         "host, torch.distributed across hosts) or 'dist'")
    return arenas

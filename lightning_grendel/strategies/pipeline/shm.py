"""Shared-memory transport for ranks on one host: a payload is written once and read by each receiver.

Over loopback TCP every receiver's copy costs the same CPU whichever rank forwards it (each hop copies
the bytes into and out of the kernel), so a broadcast cannot beat separate sends on one machine. Through
shared memory a broadcast is one write plus one read per receiver while ``send_recv`` still writes once
per receiver: the saving the broadcast-based method is about (NCCL gets the same effect inside a node
from its shared-memory and peer-to-peer transports). Each rank owns one arena file in ``/dev/shm``,
laid out per plan by :func:`arena_layout`; only tiny gloo messages carry the signals.
"""

from __future__ import annotations

import mmap
import os
import socket
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lightning_grendel.strategies.pipeline.plan import Broadcast, ReshardPlan, Send

SHM_DIRECTORY = "/dev/shm"
_ALIGN = 64  # cache-line aligned slots; also a multiple of every dtype's item size
_HOSTNAME_BYTES = 256


@dataclass(frozen=True)
class ArenaLayout:
    """Where each writer puts each payload of one plan, and who reads what it wrote."""

    offsets: dict[tuple[int, int], int]  # (op index, writer rank) -> byte offset in that writer's arena
    sizes: dict[int, int]  # writer rank -> bytes its arena needs for this plan
    readers: dict[int, frozenset[int]]  # writer rank -> the other ranks that read from its arena


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def arena_layout(plan: ReshardPlan) -> ArenaLayout:
    """Give every payload its own slot, so nothing is overwritten before the end of the plan.

    A ``Send`` and a ``Broadcast`` are written by their sender; a ``Gather`` by each of its members (its
    contribution), read by every other member.
    """
    offsets: dict[tuple[int, int], int] = {}
    sizes: dict[int, int] = {}
    readers: dict[int, set[int]] = {}
    for index, op in enumerate(plan.ops):
        if isinstance(op, Send):
            writes = [(op.sender, (op.receiver,))]
        elif isinstance(op, Broadcast):
            writes = [(op.ranks[0], op.ranks[1:])]
        else:
            writes = [(member, tuple(r for r in op.ranks if r != member)) for member in op.ranks]
        nbytes = _aligned(plan.op_bytes(op))
        for writer, reads in writes:
            offsets[(index, writer)] = sizes.get(writer, 0)
            sizes[writer] = sizes.get(writer, 0) + nbytes
            readers.setdefault(writer, set()).update(reads)
    return ArenaLayout(offsets, sizes, {w: frozenset(r) for w, r in readers.items()})


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


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class SharedMemoryArenas:
    """This rank's arena (grown on demand) and read mappings of the arenas of the ranks on its host.

    Collective over the default process group when created: ranks exchange host names and agree on a
    session id, so several jobs on one machine never share files. The arena file is removed when this
    object is garbage-collected or the process exits.
    """

    def __init__(self, directory: str = SHM_DIRECTORY) -> None:
        if not dist.is_initialized():
            raise RuntimeError("SharedMemoryArenas needs an initialised torch.distributed process group")
        self.rank = dist.get_rank()
        self.hosts = _all_hostnames()
        session = torch.zeros(1, dtype=torch.int64)
        if self.rank == 0:
            session[0] = int.from_bytes(os.urandom(7), "little")
        dist.broadcast(session, src=0)
        self._prefix = os.path.join(directory, f"lightning_grendel_{int(session):x}_rank")
        self._own: tuple[mmap.mmap, torch.Tensor] | None = None
        self._peers: dict[int, tuple[mmap.mmap, torch.Tensor]] = {}
        self._finalizer = weakref.finalize(self, _unlink, self._path(self.rank))

    @staticmethod
    def available(directory: str = SHM_DIRECTORY) -> bool:
        return os.path.isdir(directory) and os.access(directory, os.W_OK)

    def on_this_host(self, ranks: Iterable[int]) -> bool:
        """True when every rank in ``ranks`` runs on the same host as this rank."""
        return all(self.hosts[r] == self.hosts[self.rank] for r in ranks)

    def _path(self, rank: int) -> str:
        return f"{self._prefix}{rank}"

    def writable(self, nbytes: int) -> torch.Tensor:
        """This rank's arena, at least ``nbytes`` long (grown before any peer is told to read it)."""
        if self._own is None or self._own[1].numel() < nbytes:
            grown = max(nbytes, 2 * self._own[1].numel() if self._own is not None else 0)
            self._own = _map(self._path(self.rank), grown, create=True)
        return self._own[1]

    def readable(self, writer: int, nbytes: int) -> torch.Tensor:
        """``writer``'s arena, mapped to at least ``nbytes``; call only after ``writer`` signalled."""
        if writer == self.rank:
            return self.writable(nbytes)
        mapped = self._peers.get(writer)
        if mapped is None or mapped[1].numel() < nbytes:
            mapped = self._peers[writer] = _map(self._path(writer), nbytes, create=False)
            if mapped[1].numel() < nbytes:
                raise RuntimeError(f"rank {writer}'s shared-memory arena holds {mapped[1].numel()} bytes, "
                                   f"fewer than the {nbytes} the plan needs")
        return mapped[1]

    def close(self) -> None:
        """Remove this rank's arena file (peers' existing mappings stay valid)."""
        self._finalizer()


def _all_hostnames() -> list[str]:
    """Host name of every rank, exchanged as fixed-size byte tensors (no pickling)."""
    name = socket.gethostname().encode()[:_HOSTNAME_BYTES]
    mine = torch.zeros(_HOSTNAME_BYTES, dtype=torch.uint8)
    mine[:len(name)] = torch.tensor(list(name), dtype=torch.uint8)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [bytes(t.tolist()).rstrip(b"\0").decode(errors="replace") for t in gathered]

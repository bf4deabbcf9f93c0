"""Resharding planner: tiles, their replicas, and unit tasks. Pure and deterministic on every rank.

A unit task is one box of the full tensor that a destination tile needs from one source tile: any of
the source tile's replicas may send it, and every replica of the destination tile must receive it.
Boxes are intersected directly, so misaligned boundaries (mesh (2,4) -> (3,4)) and ``torch.chunk``
uneven sizes need no special case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_grendel.resharding.mesh import Mesh, ShardingSpec, check_disjoint, local_box

Box = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Tile:
    """A box of the full tensor and the ranks (in mesh order) that hold a copy of it."""

    box: Box
    replicas: tuple[int, ...]


@dataclass(frozen=True)
class UnitTask:
    """``box`` (full-tensor coordinates) moves from one of ``senders`` to every rank in ``receivers``."""

    box: Box
    src_box: Box
    dst_box: Box
    senders: tuple[int, ...]
    receivers: tuple[int, ...]

    @property
    def numel(self) -> int:
        return box_numel(self.box)


def box_numel(box: Box) -> int:
    n = 1
    for start, stop in box:
        n *= stop - start
    return n


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(stop - start for start, stop in box)


def intersect(a: Box, b: Box) -> Box | None:
    """Overlap of two boxes, or None when they do not overlap."""
    out = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b, strict=True))
    return out if all(start < stop for start, stop in out) else None


def tiles(mesh: Mesh, spec: ShardingSpec, shape: Sequence[int]) -> list[Tile]:
    """Distinct non-empty boxes held on ``mesh`` under ``spec``, each with its replicas, in mesh order."""
    holders: dict[Box, list[int]] = {}
    for rank in mesh.ranks:
        box = local_box(mesh, spec, shape, rank)
        if box_numel(box) > 0:
            holders.setdefault(box, []).append(rank)
    return [Tile(box, tuple(ranks)) for box, ranks in holders.items()]


def validate_resharding(shape: Sequence[int], src_mesh: Mesh, src_spec: ShardingSpec, dst_mesh: Mesh,
                        dst_spec: ShardingSpec) -> None:
    """All input checks, raised before any communication happens."""
    if any(s < 0 for s in shape):
        raise ValueError(f"invalid tensor shape {tuple(shape)}")
    check_disjoint([src_mesh, dst_mesh])
    src_spec.validate(src_mesh, shape)
    dst_spec.validate(dst_mesh, shape)


def unit_tasks(shape: Sequence[int], src_mesh: Mesh, src_spec: ShardingSpec, dst_mesh: Mesh,
               dst_spec: ShardingSpec) -> list[UnitTask]:
    """Every (destination tile, source tile) overlap, ordered by destination tile then source tile."""
    shape = tuple(shape)
    validate_resharding(shape, src_mesh, src_spec, dst_mesh, dst_spec)
    sources = tiles(src_mesh, src_spec, shape)
    tasks = []
    for dst in tiles(dst_mesh, dst_spec, shape):
        for src in sources:
            overlap = intersect(dst.box, src.box)
            if overlap is not None:
                tasks.append(UnitTask(overlap, src.box, dst.box, src.replicas, dst.replicas))
    return tasks

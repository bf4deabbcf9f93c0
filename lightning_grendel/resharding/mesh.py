"""Device meshes and sharding specs: the vocabulary every other pipeline module speaks.

A mesh is a list of global ranks laid out row-major in a shape; a sharding spec says, per tensor dim,
whether it is replicated (``R``) or chunked over one or more mesh axes (``S0``, ``S1``, ``S01``).
Chunks follow ``torch.chunk`` semantics (size ``ceil(n / k)``, the last ones may be short or empty), so
uneven sizes work. A dim over several axes is chunked once into their product: for ``S01`` on 13 rows
of a (2, 2) mesh that is [4, 4, 4, 1], where DTensor's nested ``[Shard(0), Shard(0)]`` gives [4, 3, 3, 3]
(the two agree for one axis, or when the sizes divide evenly).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

_TOKEN = re.compile(r"R|S\d+")


@dataclass(frozen=True)
class Mesh:
    """Global ``ranks`` arranged row-major in ``shape`` (axis 0 is conventionally the host axis)."""

    ranks: tuple[int, ...]
    shape: tuple[int, ...]

    def __init__(self, ranks: Sequence[int], shape: Sequence[int] | None = None) -> None:
        ranks = tuple(int(r) for r in ranks)
        shape = tuple(int(s) for s in shape) if shape is not None else (1, len(ranks))
        if not ranks:
            raise ValueError("a mesh needs at least one rank")
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"mesh ranks {list(ranks)} contain duplicates")
        if any(r < 0 for r in ranks):
            raise ValueError(f"mesh ranks {list(ranks)} must be non-negative")
        if any(s < 1 for s in shape) or math.prod(shape) != len(ranks):
            raise ValueError(f"mesh shape {shape} does not hold exactly {len(ranks)} ranks")
        object.__setattr__(self, "ranks", ranks)
        object.__setattr__(self, "shape", shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return len(self.ranks)

    def coordinate(self, rank: int) -> tuple[int, ...]:
        """Mesh coordinate of a global rank."""
        return self.coordinates[self.ranks.index(rank)]

    @cached_property
    def coordinates(self) -> tuple[tuple[int, ...], ...]:
        return tuple(itertools.product(*(range(s) for s in self.shape)))

    def rank_at(self, coordinate: Sequence[int]) -> int:
        index = 0
        for c, s in zip(coordinate, self.shape, strict=True):
            index = index * s + c
        return self.ranks[index]

    def axis_groups(self, axis: int) -> list[tuple[int, ...]]:
        """Rank lists along ``axis`` (one per position on the other axes), in a fixed order."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for coordinate, rank in zip(self.coordinates, self.ranks, strict=True):
            key = coordinate[:axis] + coordinate[axis + 1:]
            groups.setdefault(key, []).append(rank)
        return [tuple(g) for g in groups.values()]


def check_disjoint(meshes: Sequence[Mesh]) -> None:
    """Stage meshes (and the two sides of a resharding) must not share ranks."""
    seen: dict[int, int] = {}
    for index, mesh in enumerate(meshes):
        for rank in mesh.ranks:
            if rank in seen:
                raise ValueError(f"rank {rank} appears in mesh {seen[rank]} and mesh {index}; meshes must be disjoint")
            seen[rank] = index


@dataclass(frozen=True)
class ShardingSpec:
    """Per tensor dim, the tuple of mesh axes it is chunked over (empty tuple = replicated)."""

    dims: tuple[tuple[int, ...], ...]

    @classmethod
    def parse(cls, spec: str | ShardingSpec, ndim: int | None = None) -> ShardingSpec:
        """Parse ``"S0R"``-style text; a spec shorter than ``ndim`` is padded with ``R``."""
        if isinstance(spec, ShardingSpec):
            parsed = spec
        else:
            text = spec.replace(" ", "")
            tokens = _TOKEN.findall(text)
            if "".join(tokens) != text or not tokens:
                raise ValueError(f"cannot parse sharding spec {spec!r}: use tokens R or S<axes>, e.g. 'S0R', 'RS01'")
            parsed = cls(tuple(() if t == "R" else tuple(int(c) for c in t[1:]) for t in tokens))
        if ndim is not None:
            if len(parsed.dims) > ndim:
                raise ValueError(f"sharding spec {parsed} has {len(parsed.dims)} dims but the tensor has {ndim}")
            parsed = cls(parsed.dims + ((),) * (ndim - len(parsed.dims)))
        return parsed

    def __str__(self) -> str:
        return "".join("S" + "".join(map(str, axes)) if axes else "R" for axes in self.dims)

    def validate(self, mesh: Mesh, shape: Sequence[int]) -> None:
        """Raise a clear error for unknown mesh axes, reused axes, or dims smaller than their shard count."""
        if len(self.dims) != len(shape):
            raise ValueError(f"sharding spec {self} has {len(self.dims)} dims but the tensor shape is {tuple(shape)}")
        used: set[int] = set()
        for dim, axes in enumerate(self.dims):
            for axis in axes:
                if axis >= mesh.ndim:
                    raise ValueError(
                        f"sharding spec {self} names mesh axis {axis}, but mesh shape {mesh.shape} has axes "
                        f"0..{mesh.ndim - 1}"
                    )
                if axis in used:
                    raise ValueError(f"sharding spec {self} uses mesh axis {axis} for more than one tensor dim")
                used.add(axis)
            parts = self.num_chunks(mesh, dim)
            if shape[dim] < parts:
                raise ValueError(
                    f"tensor dim {dim} has size {shape[dim]}, smaller than its {parts} shards under spec {self} "
                    f"on mesh {mesh.shape}"
                )

    def num_chunks(self, mesh: Mesh, dim: int) -> int:
        return math.prod(mesh.shape[a] for a in self.dims[dim])

    def chunk_index(self, mesh: Mesh, coordinate: Sequence[int], dim: int) -> int:
        """Chunk of ``dim`` held at a mesh coordinate; the first listed axis is the major one."""
        index = 0
        for axis in self.dims[dim]:
            index = index * mesh.shape[axis] + coordinate[axis]
        return index

    def replicated_axes(self, mesh: Mesh) -> tuple[int, ...]:
        used = {a for axes in self.dims for a in axes}
        return tuple(a for a in range(mesh.ndim) if a not in used)


def chunk_bounds(size: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of chunk ``index`` of ``parts`` under ``torch.chunk`` semantics (may be empty)."""
    step = -(-size // parts)
    return min(index * step, size), min((index + 1) * step, size)


def local_box(mesh: Mesh, spec: ShardingSpec, shape: Sequence[int], rank: int) -> tuple[tuple[int, int], ...]:
    """The box ``((start, stop), ...)`` of the full tensor that ``rank`` holds under ``spec``."""
    coordinate = mesh.coordinate(rank)
    return tuple(
        chunk_bounds(shape[d], spec.num_chunks(mesh, d), spec.chunk_index(mesh, coordinate, d))
        for d in range(len(shape))
    )


def local_shape(mesh: Mesh, spec: ShardingSpec, shape: Sequence[int], rank: int) -> tuple[int, ...]:
    return tuple(stop - start for start, stop in local_box(mesh, spec, shape, rank))


def box_slices(box: Sequence[tuple[int, int]], origin: Sequence[int] | None = None) -> tuple[slice, ...]:
    """Python slices for a box, relative to ``origin`` (the start corner of the buffer it indexes)."""
    origin = origin or (0,) * len(box)
    return tuple(slice(start - o, stop - o) for (start, stop), o in zip(box, origin, strict=True))

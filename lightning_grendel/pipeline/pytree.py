"""Pytrees between pipeline stages: micro-batches, per-leaf layouts, and the checks that keep them honest.

A batch, a stage input or a stage output may be any pytree (``torch.utils._pytree``: tuples, lists,
dicts, registered dataclasses). Tensor leaves cross a stage boundary through the resharding
executors, each with its own sharding spec on the destination mesh; every other leaf (an int, a flag,
``None``) is known to every rank from the layout pass and is not sent. A micro-batch is the same
pytree with every tensor of at least one dim cut on its first dim (torch pipelining's default chunk
spec), so the sample count of a batch is that shared first dim.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, _broadcast_to_and_flatten, keystr, tree_flatten, tree_flatten_with_path

from lightning_grendel.resharding.mesh import Mesh, ShardingSpec, chunk_bounds, local_box


def _is_batched(leaf: Any) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.ndim > 0


def sample_count(tree: Any, what: str = "batch") -> int:
    """The first dim shared by every tensor leaf of at least one dim (an error names any that differ)."""
    counts = {keystr(path): leaf.shape[0] for path, leaf in tree_flatten_with_path(tree)[0] if _is_batched(leaf)}
    if not counts:
        raise ValueError(f"the {what} has no tensor with a sample dim to cut into micro-batches")
    if len(set(counts.values())) > 1:
        raise ValueError(f"the {what}'s tensors disagree on the sample count (their first dim): {counts}; every "
                         "tensor of a batch is cut on its first dim into micro-batches")
    return next(iter(counts.values()))


def split_microbatches(batch: Any, num_microbatches: int) -> tuple[list[Any], list[int]]:
    """``num_microbatches`` micro-batches of ``batch`` and their sample counts (``torch.tensor_split`` sizes)."""
    total = sample_count(batch)
    if total < num_microbatches:
        raise ValueError(f"batch of {total} samples cannot be cut into {num_microbatches} micro-batches")
    leaves, spec = tree_flatten(batch)
    pieces = [leaf.tensor_split(num_microbatches) if _is_batched(leaf) else None for leaf in leaves]
    micro = [spec.unflatten([leaf if piece is None else piece[m] for leaf, piece in zip(leaves, pieces, strict=True)])
             for m in range(num_microbatches)]
    return micro, [sample_count(mb) for mb in micro]


def take_rows(tree: Any, start: int, stop: int) -> Any:
    """Samples ``[start, stop)`` of a micro-batch: every tensor of at least one dim sliced on its first dim."""
    leaves, spec = tree_flatten(tree)
    return spec.unflatten([leaf[start:stop] if _is_batched(leaf) else leaf for leaf in leaves])


def signature(tree: Any) -> Hashable:
    """What layouts depend on: the structure, each tensor's shape and dtype, every other leaf's value."""
    leaves, spec = tree_flatten(tree)
    return spec, tuple((tuple(leaf.shape), leaf.dtype) if isinstance(leaf, torch.Tensor) else _constant(leaf)
                       for leaf in leaves)


def _constant(value: Any) -> Hashable:
    try:
        hash(value)
    except TypeError:
        return ("unhashable", type(value).__name__, repr(value))
    return ("value", value)


def to_meta(tree: Any) -> Any:
    """The same pytree with every tensor replaced by an empty one on the meta device."""
    leaves, spec = tree_flatten(tree)
    return spec.unflatten([torch.empty(leaf.shape, dtype=leaf.dtype, device="meta")
                           if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves])


@dataclass(frozen=True)
class TensorLeaf:
    """A tensor crossing a boundary: its full (whole micro-batch) shape and its spec on the stage mesh."""

    path: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    spec: ShardingSpec

    @property
    def differentiable(self) -> bool:
        """Floating-point leaves get a gradient sent back (zeros where the loss does not depend on them)."""
        return self.dtype.is_floating_point or self.dtype.is_complex


@dataclass(frozen=True)
class Layout:
    """A stage input or output: its structure and, per leaf, a :class:`TensorLeaf` or the constant value."""

    spec: TreeSpec
    leaves: tuple[Any, ...]

    @property
    def tensors(self) -> list[tuple[int, TensorLeaf]]:
        return [(i, leaf) for i, leaf in enumerate(self.leaves) if isinstance(leaf, TensorLeaf)]

    def local(self, tree: Any, mesh: Mesh, rank: int) -> Any:
        """This rank's part of the whole ``tree`` (tensors cut to their local boxes)."""
        leaves = tree_flatten(tree)[0]
        return self.spec.unflatten([
            leaf[tuple(slice(a, b) for a, b in local_box(mesh, layout.spec, layout.shape, rank))]
            if isinstance(layout, TensorLeaf) else layout for leaf, layout in zip(leaves, self.leaves, strict=True)])

    def zeros(self, mesh: Mesh, rank: int, device: torch.device) -> list[torch.Tensor]:
        """This rank's tensors of the layout, zero-filled: what a rank whose step failed sends on."""
        return [torch.zeros([b - a for a, b in local_box(mesh, leaf.spec, leaf.shape, rank)], dtype=leaf.dtype,
                            device=device) for _, leaf in self.tensors]

    def assemble(self, tensors: Sequence[torch.Tensor]) -> Any:
        """The pytree from received tensors (in leaf order) and the layout's constants."""
        received = iter(tensors)
        return self.spec.unflatten([next(received) if isinstance(leaf, TensorLeaf) else leaf for leaf in self.leaves])

    def check(self, tree: Any, mesh: Mesh, rank: int, where: str) -> list[torch.Tensor]:
        """The tensor leaves of ``tree``, after checking it has this layout on ``rank`` (a clear error if not)."""
        pairs, spec = tree_flatten_with_path(tree)
        if spec != self.spec:
            raise ValueError(f"{where} changed structure between micro-batches (or from the layout pass): "
                             f"expected {self.spec}, got {spec}")
        tensors = []
        for (path, leaf), layout in zip(pairs, self.leaves, strict=True):
            if isinstance(layout, TensorLeaf):
                want = tuple(b - a for a, b in local_box(mesh, layout.spec, layout.shape, rank))
                if not isinstance(leaf, torch.Tensor) or tuple(leaf.shape) != want or leaf.dtype != layout.dtype:
                    got = (tuple(leaf.shape), leaf.dtype) if isinstance(leaf, torch.Tensor) else type(leaf).__name__
                    raise ValueError(f"{where}: leaf {keystr(path)} is {got} on rank {rank}; its layout "
                                     f"{layout.spec} of {layout.shape} needs {(want, layout.dtype)}")
                tensors.append(leaf)
            elif isinstance(leaf, torch.Tensor) or _constant(leaf) != _constant(layout):
                raise ValueError(f"{where}: leaf {keystr(path)} is {leaf!r}, but it was {layout!r} in the layout pass "
                                 "(values other than tensors must not change between micro-batches)")
        return tensors


def input_layout(tree: Any, specs: Any, mesh: Mesh, samples: int, where: str,
                 forbidden_axis: int | None = None) -> tuple[Layout, tuple[int, ...]]:
    """A stage input's layout from its spec(s), and the mesh axes its samples are spread over.

    ``specs`` is one spec string for every tensor leaf or a pytree of them shaped like the input (a
    prefix of it). Only the first (sample) dim may be sharded, every sharded leaf over the same axes,
    and a sharded leaf's first dim must be the micro-batch's sample count.
    """
    pairs, spec = tree_flatten_with_path(tree)
    per_leaf = _broadcast_to_and_flatten(specs, spec)
    if per_leaf is None:
        raise ValueError(f"{where}: input_spec {specs!r} does not match the input's structure {spec}")
    leaves: list[Any] = []
    batch_axes: tuple[int, ...] | None = None
    for (path, leaf), text in zip(pairs, per_leaf, strict=True):
        if not isinstance(leaf, torch.Tensor):
            leaves.append(leaf)
            continue
        name = f"{where} input leaf {keystr(path) or '(the input)'}"
        parsed = ShardingSpec.parse(text, leaf.ndim)
        if any(parsed.dims[1:]):
            raise ValueError(f"{name}: spec {parsed} shards a dim other than the first (sample) dim")
        axes = parsed.dims[0] if parsed.dims else ()
        for axis in axes:
            if axis >= mesh.ndim:
                raise ValueError(f"{name}: spec {parsed} names mesh axis {axis}, but the stage mesh has shape "
                                 f"{mesh.shape}")
        if forbidden_axis is not None and forbidden_axis in axes:
            raise ValueError(f"{name}: the last mesh axis is the tensor-parallel axis, so spec {parsed} must not "
                             "shard samples over it")
        if axes:
            if leaf.shape[0] != samples:
                raise ValueError(f"{name} has first dim {leaf.shape[0]} but the micro-batch has {samples} samples: "
                                 "only a sample dim can be sharded; give this leaf 'R' (input_spec may be a pytree "
                                 "of specs shaped like the input)")
            if batch_axes is not None and axes != batch_axes:
                raise ValueError(f"{name}: spec {parsed} spreads samples over mesh axes {axes}, another leaf over "
                                 f"{batch_axes}; a stage's samples are split one way")
            batch_axes = axes
        parsed.validate(mesh, leaf.shape)
        leaves.append(TensorLeaf(keystr(path), tuple(leaf.shape), leaf.dtype, parsed))
    return Layout(spec, tuple(leaves)), batch_axes or ()


def output_layout(tree: Any, mesh: Mesh, batch_axes: tuple[int, ...], samples: int, where: str,
                  tensor_parallel_axis: int | None = None) -> Layout:
    """A stage output's layout on its own mesh: samples stay where the input put them.

    A data-parallel stage's output tensors must keep the sample dim first (a flattened ``[B*T, D]``
    cannot be told apart by rank); a column-parallel stage's single output is also sharded on its last
    dim over the tensor-parallel axis.
    """
    pairs, spec = tree_flatten_with_path(tree)
    tensors = [leaf for _, leaf in pairs if isinstance(leaf, torch.Tensor)]
    if tensor_parallel_axis is not None and (len(tensors) != 1 or tensors[0].ndim < 2):
        raise ValueError(f"{where}: a column-parallel stage must output one tensor with a feature dim after the "
                         "sample dim")
    leaves: list[Any] = []
    for path, leaf in pairs:
        if not isinstance(leaf, torch.Tensor):
            leaves.append(leaf)
            continue
        dims: list[tuple[int, ...]] = [()] * leaf.ndim
        if batch_axes:
            if leaf.ndim == 0 or leaf.shape[0] != samples:
                raise ValueError(f"{where} output leaf {keystr(path) or '(the output)'} has shape {tuple(leaf.shape)}"
                                 f", but the stage is data parallel (samples over mesh axes {batch_axes}) and the "
                                 f"micro-batch has {samples} samples: keep the sample dim first in every output")
            dims[0] = batch_axes
        if tensor_parallel_axis is not None:
            dims[-1] = (tensor_parallel_axis,)
        parsed = ShardingSpec(tuple(dims))
        parsed.validate(mesh, leaf.shape)
        leaves.append(TensorLeaf(keystr(path), tuple(leaf.shape), leaf.dtype, parsed))
    return Layout(spec, tuple(leaves))


def rows_of(mesh: Mesh, batch_axes: tuple[int, ...], samples: int, rank: int) -> tuple[int, int]:
    """Samples ``[start, stop)`` of a micro-batch that ``rank`` computes when they are spread over ``batch_axes``."""
    spec = ShardingSpec((batch_axes,))
    return chunk_bounds(samples, spec.num_chunks(mesh, 0), spec.chunk_index(mesh, mesh.coordinate(rank), 0))

"""Shared helpers for the pipeline tests: spec enumeration and expected shards from the full tensor."""

from __future__ import annotations

import itertools

import torch

from lightning_grendel.resharding.mesh import Mesh, ShardingSpec, box_slices, local_box


def all_specs(tensor_ndim: int, mesh_ndim: int) -> list[str]:
    """Every spec: each mesh axis unused or on one tensor dim, every order of axes within a dim."""
    specs = []
    for placement in itertools.product(range(-1, tensor_ndim), repeat=mesh_ndim):
        per_dim = [[a for a in range(mesh_ndim) if placement[a] == d] for d in range(tensor_ndim)]
        for orders in itertools.product(*(itertools.permutations(axes) for axes in per_dim)):
            specs.append(str(ShardingSpec(tuple(tuple(o) for o in orders))))
    return specs


def expected_shard(full: torch.Tensor, mesh: Mesh, spec: str, rank: int) -> torch.Tensor:
    parsed = ShardingSpec.parse(spec, full.ndim)
    return full[box_slices(local_box(mesh, parsed, tuple(full.shape), rank))]


def test_tensor(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Distinct values everywhere, so any misplaced element is caught bit for bit."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator)


test_tensor.__test__ = False

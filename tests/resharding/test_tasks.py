"""Planner, specs and single-process executor: pure functions, checked against full-tensor slices."""

from __future__ import annotations

import pytest
import torch

from lightning_grendel.resharding import (
    EXECUTORS,
    SENDER_MODES,
    Mesh,
    ShardingSpec,
    make_plan,
    simulate_plan,
    tiles,
    unit_tasks,
)
from lightning_grendel.resharding.mesh import chunk_bounds
from tests.helpers.pipeline_cases import all_specs, expected_shard, test_tensor

MESH_PAIRS = {
    "(1,2)->(1,2)": (Mesh(range(2), (1, 2)), Mesh(range(2, 4), (1, 2))),
    "(2,2)->(2,2)": (Mesh(range(4), (2, 2)), Mesh(range(4, 8), (2, 2))),
    "(1,4)->(1,4)": (Mesh(range(4), (1, 4)), Mesh(range(4, 8), (1, 4))),
    "(2,4)->(3,4)": (Mesh(range(8), (2, 4)), Mesh(range(8, 20), (3, 4))),
    "(1,4)->(2,4)": (Mesh(range(4), (1, 4)), Mesh(range(4, 12), (2, 4))),
}


def _reshard_in_process(full, src, src_spec, dst, dst_spec, executor, sender_mode):
    plan = make_plan(full.shape, full.dtype, src, src_spec, dst, dst_spec, executor, sender_mode)
    shards = {r: expected_shard(full, src, src_spec, r) for r in src.ranks}
    return simulate_plan(plan, shards)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("pair", list(MESH_PAIRS))
def test_every_spec_pair_every_executor_every_mode(pair):
    src, dst = MESH_PAIRS[pair]
    full = test_tensor((13, 14))  # uneven under every shard count used here
    specs = all_specs(2, 2)
    for src_spec in specs:
        for dst_spec in specs:
            for executor in EXECUTORS:
                for sender_mode in SENDER_MODES:
                    outs = _reshard_in_process(full, src, src_spec, dst, dst_spec, executor, sender_mode)
                    for rank in dst.ranks:
                        assert torch.equal(outs[rank], expected_shard(full, dst, dst_spec, rank)), (
                            pair, src_spec, dst_spec, executor, sender_mode, rank)


# Alpa's n-to-m suite: (src mesh, src spec, dst mesh, dst spec, unit tasks, (N senders, M receivers)).
ALPA_SUITE = [
    ((2, 4), "S0RR", (2, 4), "S0RR", 2, (4, 4)),
    ((2, 4), "RRR", (2, 4), "S0RR", 2, (8, 4)),
    ((2, 4), "RS0R", (2, 4), "S0RR", 4, (4, 4)),
    ((2, 4), "RS01R", (2, 4), "S01RR", 64, (1, 1)),
    ((2, 4), "S1RR", (2, 4), "S0RR", 4, (2, 4)),
    ((2, 4), "S0RR", (3, 4), "S0RR", 4, (4, 4)),
    ((1, 4), "S1RR", (2, 4), "RRR", 4, (1, 8)),
    ((2, 4), "RS0R", (2, 4), "RRS0", 4, (4, 4)),
]


@pytest.mark.parametrize("case", ALPA_SUITE, ids=[f"{c[1]}->{c[3]}" for c in ALPA_SUITE])
def test_unit_tasks_match_the_paper_suite(case):
    src_shape, src_spec, dst_shape, dst_spec, count, (n, m) = case
    src = Mesh(range(8 - 8 + src_shape[0] * src_shape[1]), src_shape)
    dst = Mesh(range(src.size, src.size + dst_shape[0] * dst_shape[1]), dst_shape)
    tasks = unit_tasks((1024, 64, 8), src, ShardingSpec.parse(src_spec), dst, ShardingSpec.parse(dst_spec))
    assert len(tasks) == count
    assert {(len(t.senders), len(t.receivers)) for t in tasks} == {(n, m)}
    full = torch.arange(1024 * 64 * 8, dtype=torch.int32).reshape(1024, 64, 8)
    outs = _reshard_in_process(full, src, src_spec, dst, dst_spec, "broadcast", "loadbalance_order")
    for rank in dst.ranks:
        assert torch.equal(outs[rank], expected_shard(full, dst, dst_spec, rank))


def test_misaligned_tile_straddles_two_source_tiles():
    src, dst = Mesh(range(8), (2, 4)), Mesh(range(8, 20), (3, 4))
    tasks = unit_tasks((12, 4), src, ShardingSpec.parse("S0R"), dst, ShardingSpec.parse("S0R"))
    middle = [t for t in tasks if t.dst_box == ((4, 8), (0, 4))]
    assert [t.box for t in middle] == [((4, 6), (0, 4)), ((6, 8), (0, 4))]
    assert [t.senders for t in middle] == [(0, 1, 2, 3), (4, 5, 6, 7)]


def test_tiles_follow_torch_chunk():
    mesh = Mesh(range(4), (1, 4))
    found = tiles(mesh, ShardingSpec.parse("S1"), (5,))
    want = [c.shape[0] for c in torch.arange(5).chunk(4)]
    assert [t.box[0][1] - t.box[0][0] for t in found] == want
    assert chunk_bounds(5, 4, 3) == (5, 5)  # torch.chunk gives only 3 chunks: the 4th device holds nothing
    assert [t.replicas for t in tiles(Mesh(range(4), (2, 2)), ShardingSpec.parse("S1"), (4,))] == [(0, 2), (1, 3)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dst_mesh": Mesh([1, 2], (1, 2))}, "rank 1 appears in mesh 0 and mesh 1"),
        ({"src_spec": "S2R"}, "names mesh axis 2"),
        ({"shape": (3, 8)}, "smaller than its 4 shards"),
        ({"src_spec": "S0S0"}, "more than one tensor dim"),
        ({"src_spec": "X1"}, "cannot parse sharding spec"),
        ({"src_spec": "RRR"}, "has 3 dims but the tensor has 2"),
        ({"executor": "nccl_magic"}, "unknown resharding executor"),
        ({"sender_mode": "fastest"}, "unknown sender_mode"),
    ],
)
def test_bad_input_is_rejected_by_the_planner(kwargs, message):
    args = {"shape": (8, 8), "dtype": torch.float32, "src_mesh": Mesh([0, 1, 2, 3], (2, 2)), "src_spec": "S01R",
            "dst_mesh": Mesh([4, 5], (1, 2)), "dst_spec": "RS1", "executor": "broadcast", "sender_mode": "normal"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        make_plan(**args)


@pytest.mark.parametrize("ranks, shape, message", [([0, 0], (1, 2), "duplicates"), ([0, 1, 2], (2, 2), "exactly 3")])
def test_bad_meshes(ranks, shape, message):
    with pytest.raises(ValueError, match=message):
        Mesh(ranks, shape)

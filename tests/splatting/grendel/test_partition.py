"""Grendel's Algorithm 1: contiguous parts of near-equal cost covering every tile row once."""

from __future__ import annotations

import pytest
import torch

from lightning_grendel.splatting.grendel.balancer import LoadBalancer, imbalance
from lightning_grendel.splatting.grendel.partition import (
    all_tasks,
    halo_transfers,
    own_pixel_rows,
    part_costs,
    partition_rows,
)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("seed", range(5))
def test_parts_are_within_one_row_cost_of_ideal(world, seed):
    costs = torch.rand(40, generator=torch.Generator().manual_seed(seed)) ** 3 * 10
    cuts = partition_rows(costs, world)
    assert cuts[0] == 0 and cuts[-1] == 40 and (cuts.diff() >= 1).all()
    ideal = float(costs.sum()) / world
    parts = part_costs(costs, cuts)
    assert torch.allclose(parts.sum(), costs.sum().double())
    assert (parts - ideal).abs().max() <= float(costs.max()) + 1e-9


def test_every_row_is_covered_exactly_once_across_views():
    tiles_y, views, world = 5, 3, 4
    cuts = partition_rows(torch.ones(views * tiles_y), world)
    covered = torch.zeros(views, tiles_y, dtype=torch.int64)
    for tasks in all_tasks(cuts, tiles_y):
        assert tasks, "every rank gets at least one row"
        for task in tasks:
            covered[task.view, task.tile_row_start : task.tile_row_end] += 1
    assert (covered == 1).all()


def test_too_few_rows_for_the_ranks_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot split 3 tile rows over 4 ranks"):
        partition_rows(torch.ones(3), 4)


def test_balancer_reuses_measured_costs_and_improves_balance():
    tiles_y, world = 12, 3
    measured = torch.cat([torch.full((3,), 20.0), torch.ones(9)])[None]  # a costly top band
    balancer = LoadBalancer("pairs")
    uniform = balancer.row_costs(torch.tensor([7]), 1, tiles_y)
    before = imbalance(part_costs(measured[0], partition_rows(uniform, world)))
    balancer.record(torch.tensor([7]), measured)
    learned = balancer.row_costs(torch.tensor([7]), 1, tiles_y)
    after = imbalance(part_costs(measured[0], partition_rows(learned, world)))
    assert before > 1.5 and after < before
    assert after <= 1 + float(measured.max()) * world / float(measured.sum())
    off = LoadBalancer("off")
    off.record(torch.tensor([7]), measured)
    assert torch.equal(off.row_costs(torch.tensor([7]), 1, tiles_y), uniform)


def test_evaluation_partitions_may_leave_ranks_idle():
    cuts = partition_rows(torch.ones(2), 3, allow_empty=True)
    assert cuts.tolist() == [0, 1, 2, 2]
    assert [len(tasks) for tasks in all_tasks(cuts, 2)] == [1, 1, 0]


@pytest.mark.parametrize(("world", "views", "height", "halo"), [(2, 1, 72, 5), (3, 2, 100, 5), (4, 3, 41, 5),
                                                                 (5, 2, 100, 20), (3, 1, 50, 0)])
def test_halo_transfers_deliver_each_halo_row_once_from_its_owner(world, views, height, halo):
    tiles_y = -(-height // 16)
    costs = torch.rand(views * tiles_y, generator=torch.Generator().manual_seed(world + height))
    tasks = all_tasks(partition_rows(costs, world), tiles_y)
    owner = torch.full((views, height), -1)
    for rank, rank_tasks in enumerate(tasks):
        for task in rank_tasks:
            start, end = own_pixel_rows(task, height)
            owner[task.view, start:end] = rank
    assert (owner >= 0).all()
    transfers = halo_transfers(tasks, height, halo)
    assert transfers == sorted(transfers)
    for rank, rank_tasks in enumerate(tasks):
        for task in rank_tasks:
            start, end = own_pixel_rows(task, height)
            wanted = torch.zeros(height, dtype=torch.int64)
            wanted[max(0, start - halo) : start] = 1
            wanted[end : min(height, end + halo)] = 1
            got = torch.zeros(height, dtype=torch.int64)
            for t in transfers:
                if t.target == rank and t.view == task.view:
                    assert t.source != rank
                    assert (owner[t.view, t.row_start : t.row_end] == t.source).all()
                    got[t.row_start : t.row_end] += 1
            assert torch.equal(got, wanted)

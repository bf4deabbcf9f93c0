"""Grendel's distributed renderer: project the local shard, ship splats to the ranks whose pixels they
touch, and render this rank's rows.

Step by step, for a batch of B views on W ranks:
1. cut the B·T stacked tile rows into W parts (same cut on every rank, from the balancer's costs);
2. project this rank's Gaussians onto all B cameras;
3. for every (destination rank, view), select the splats that can blend into that rank's pixel rows
   (:mod:`~lightning_grendel.splatting.footprint`), and send their 11 floats with one sparse all-to-all;
4. rasterize this rank's rows from what arrived; the all-to-all's backward routes gradients home
   (with ``absgrad``, two more zero columns carry the probe, whose per-pixel absolute gradients then
   come home too and add up on the owner over every rank that rendered the Gaussian);
5. for SSIM, swap the ``halo`` rendered pixel rows on each side of every cut with the neighbouring
   rank (a second, small all-to-all whose backward returns those pixels' gradients).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_grendel.splatting.cameras import Cameras
from lightning_grendel.splatting.footprint import reachable_pixel_rows, reachable_tile_row_costs, reaches_rows
from lightning_grendel.splatting.grendel.balancer import LoadBalancer, imbalance
from lightning_grendel.splatting.grendel.exchange import exchange_counts, exchange_rows, sparse_all_to_all
from lightning_grendel.splatting.grendel.partition import (
    HaloTransfer,
    RowTask,
    all_tasks,
    halo_transfers,
    own_pixel_rows,
    part_costs,
    partition_rows,
)
from lightning_grendel.splatting.projection import RasterizeMode
from lightning_grendel.splatting.rasterize import rasterize
from lightning_grendel.splatting.render import RenderResult, Splats, ViewRender, splat_gaussians
from lightning_grendel.splatting.tiles import tile_bounds, tile_grid

PAYLOAD = 11  # means2d 2, conic 3, colour 3, opacity 1, depth 1, radius 1 (+ 2 absgrad probe columns)


def pack_splats(splats: Splats) -> Tensor:
    """[C, N, 11] rows of everything the rasterizer needs (13 with the absgrad probe); gradients flow
    through the float columns."""
    probe = [] if splats.absgrad_probe is None else [splats.absgrad_probe]
    return torch.cat(
        [
            splats.means2d,
            splats.conics,
            splats.colors,
            splats.opacities[..., None],
            splats.depths[..., None],
            splats.radii.to(splats.means2d.dtype)[..., None],
            *probe,
        ],
        dim=-1,
    )


def select_for_ranks(splats: Splats, tasks: list[list[RowTask]], width: int, height: int) -> tuple[Tensor, Tensor]:
    """Flat indices into [C·N] of the pairs to send, grouped by destination then view, and counts [W, C]."""
    views, count = splats.radii.shape
    bounds = tile_bounds(splats.means2d, splats.radii, width, height)
    first, end = reachable_pixel_rows(splats.means2d, splats.conics, splats.opacities, bounds)
    counts = torch.zeros(len(tasks), views, dtype=torch.int64)
    selected: list[Tensor] = []
    for rank, rank_tasks in enumerate(tasks):
        for task in rank_tasks:
            row_start, row_end = own_pixel_rows(task, height)
            index = torch.nonzero(reaches_rows(first[task.view], end[task.view], row_start, row_end)).flatten()
            selected.append(index + task.view * count)
            counts[rank, task.view] = index.numel()
    flat = torch.cat(selected) if selected else torch.zeros(0, dtype=torch.int64)
    return flat, counts


class GrendelRenderer:
    """The :class:`~lightning_grendel.splatting.render.Renderer` of GrendelStrategy (one per rank)."""

    def __init__(
        self, balancer: LoadBalancer, backend: str = "auto", group: Any = None,
        rasterize_mode: RasterizeMode = "classic",
    ) -> None:
        self.balancer = balancer
        self.backend = backend
        self.rasterize_mode = rasterize_mode
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.last_stats: dict[str, float] = {}

    def _exchange(
        self, params: dict[str, Tensor], cameras: Cameras, sh_degree: int, differentiable: bool,
        absgrad: bool = False,
    ) -> tuple[Splats, Tensor, list[list[RowTask]], list[Tensor], Tensor]:
        self._check_same_cameras(cameras)
        width, height = cameras.width, cameras.height
        _, tiles_y = tile_grid(width, height)
        costs = self.balancer.row_costs(cameras.ids, len(cameras), tiles_y)
        cuts = partition_rows(costs, self.world_size, allow_empty=not differentiable)
        tasks = all_tasks(cuts, tiles_y)
        splats = splat_gaussians(params, cameras, sh_degree, self.rasterize_mode, absgrad and differentiable)
        if differentiable and splats.means2d.requires_grad:
            splats.means2d.retain_grad()
        flat, counts = select_for_ranks(splats, tasks, width, height)
        packed = pack_splats(splats)
        rows = packed.reshape(-1, packed.shape[-1])[flat.to(splats.means2d.device)]
        received_counts = exchange_counts(counts, self.group)  # [W sources, C views]
        send, recv = counts.sum(1).tolist(), received_counts.sum(1).tolist()
        exchange = sparse_all_to_all if differentiable else exchange_rows
        received = exchange(rows, send, recv, self.group)
        per_view = _split_by_view(received, received_counts, len(cameras))
        self.last_stats = {
            "rows_sent": float(sum(send) - send[self.rank]),
            "rows_received": float(sum(recv)),
            "bytes_sent": float((sum(send) - send[self.rank]) * packed.shape[-1] * rows.element_size()),
            "halo_bytes_sent": 0.0,
            "cost_imbalance_planned": imbalance(part_costs(costs, cuts)),
        }
        return splats, cuts, tasks, per_view, received

    def _check_same_cameras(self, cameras: Cameras) -> None:
        """Every rank must render the same cameras: one small all-reduce compares a position-weighted digest.

        A DataLoader shuffled differently on each rank would otherwise give images stitched from
        different views, silently. The error is raised on every rank at once (no rank is left waiting).
        """
        parts = [cameras.world_to_camera, cameras.intrinsics]
        if cameras.ids is not None:
            parts.append(torch.as_tensor(cameras.ids))
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64).cpu() for t in parts])
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
        digest = torch.tensor([float(len(cameras)), float(cameras.width), float(cameras.height),
                               float((torch.nan_to_num(flat, nan=7.0) * weights).sum())], dtype=torch.float64)
        bounds = torch.cat([digest, -digest]).to(cameras.world_to_camera.device)
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=self.group)  # [max, -min] of every entry
        if not torch.equal(bounds[:4], -bounds[4:]):
            raise RuntimeError(
                "GrendelStrategy: the ranks got different cameras in this batch; every rank must see the same "
                "batches in the same order (GrendelStrategy turns Lightning's distributed sampler off): shuffle "
                "the train DataLoader with a seeded torch.Generator, as GaussianSplattingDataModule does"
            )

    def _render_task(
        self, task: RowTask, rows: Tensor, width: int, height: int, background: Tensor
    ) -> tuple[ViewRender, float]:
        own_start, own_end = own_pixel_rows(task, height)
        start = time.perf_counter()
        image = rasterize(
            rows[:, 0:2], rows[:, 2:5], rows[:, 5:8], rows[:, 8], rows[:, 9], rows[:, 10].round().to(torch.int32),
            width, height, background, own_start, own_end, backend=self.backend,
            absgrad_probe=rows[:, PAYLOAD : PAYLOAD + 2] if rows.shape[1] > PAYLOAD else None,
        )
        elapsed = time.perf_counter() - start
        return ViewRender(task.view, image, own_start, own_end, own_start, own_end), elapsed

    def _swap_halo(self, views: list[ViewRender], tasks: list[list[RowTask]], height: int, halo: int) -> None:
        """Widen every view by up to ``halo`` rows each side with the neighbours' rendered pixels."""
        transfers = halo_transfers(tasks, height, halo)
        if not transfers:  # the same answer on every rank: nobody joins an exchange
            return
        mine = {view.view: view for view in views}
        outgoing = [t for t in transfers if t.source == self.rank]
        incoming = [t for t in transfers if t.target == self.rank]
        blocks = [_rows_of(mine[t.view], t.row_start, t.row_end) for t in outgoing]
        _, width, channels = views[0].image.shape
        # Sliced from the images even when empty: its backward then runs before the rasterizers', in the
        # same order on every rank.
        send = torch.cat([views[0].image[:0], *blocks]).reshape(-1, width * channels)
        send_rows = _rows_by_rank(outgoing, "target", self.world_size)
        recv_rows = _rows_by_rank(incoming, "source", self.world_size)
        received = sparse_all_to_all(send, send_rows, recv_rows, self.group).reshape(-1, width, channels)
        self.last_stats["halo_bytes_sent"] = float(send.numel() * send.element_size())
        self.last_stats["bytes_sent"] += self.last_stats["halo_bytes_sent"]
        offset = 0
        above: dict[int, list[Tensor]] = {view: [] for view in mine}
        below: dict[int, list[Tensor]] = {view: [] for view in mine}
        for transfer in incoming:
            block = received[offset : offset + transfer.row_end - transfer.row_start]
            offset += block.shape[0]
            own = mine[transfer.view]
            (above if transfer.row_end <= own.own_start else below)[transfer.view].append(block)
        for view in views:
            top, bottom = above[view.view], below[view.view]
            view.row_start -= sum(block.shape[0] for block in top)
            view.row_end += sum(block.shape[0] for block in bottom)
            view.image = torch.cat([*top, view.image, *bottom])
        _keep_in_graph(views, received)

    def __call__(
        self, params: dict[str, Tensor], cameras: Cameras, sh_degree: int, background: Tensor, halo: int = 0,
        absgrad: bool = False,
    ) -> RenderResult:
        width, height = cameras.width, cameras.height
        splats, cuts, tasks, per_view, received = self._exchange(params, cameras, sh_degree, True, absgrad)
        _, tiles_y = tile_grid(width, height)
        measured = torch.zeros(len(cameras), tiles_y, dtype=torch.float64)
        views = []
        for task in tasks[self.rank]:
            view, seconds = self._render_task(task, per_view[task.view], width, height, background)
            views.append(view)
            self._measure(measured, task, per_view[task.view], seconds, width, height)
        _keep_in_graph(views, received)
        self._swap_halo(views, tasks, height, halo)
        self._update_balancer(cameras, measured, cuts)
        return RenderResult(views, splats.means2d, splats.radii, width, height, splats.absgrad_probe)

    def _measure(self, measured: Tensor, task: RowTask, rows: Tensor, seconds: float, width: int, height: int) -> None:
        span = slice(task.tile_row_start, task.tile_row_end)
        if self.balancer.mode == "time":
            measured[task.view, span] = seconds / (task.tile_row_end - task.tile_row_start)
        else:
            rows = rows.detach()
            radii = rows[:, 10].round().to(torch.int32)
            costs = reachable_tile_row_costs(rows[:, 0:2], rows[:, 2:5], rows[:, 8], radii, width, height)
            measured[task.view, span] = costs[span].cpu()

    def _update_balancer(self, cameras: Cameras, measured: Tensor, cuts: Tensor) -> None:
        dist.all_reduce(measured, group=self.group)  # ranks own disjoint rows: the sum assembles them
        self.last_stats["cost_imbalance_measured"] = imbalance(part_costs(measured.flatten(), cuts))
        self.balancer.record(cameras.ids, measured)

    def render_full(self, params: dict[str, Tensor], cameras: Cameras, sh_degree: int, background: Tensor) -> Tensor:
        """Full images [C, H, W, 3] on every rank: each renders its rows, a sum assembles them."""
        width, height = cameras.width, cameras.height
        with torch.no_grad():
            _, _, tasks, per_view, _ = self._exchange(params, cameras, sh_degree, differentiable=False)
            images = background.new_zeros(len(cameras), height, width, background.numel())
            for task in tasks[self.rank]:
                view, _ = self._render_task(task, per_view[task.view], width, height, background)
                images[task.view, view.row_start : view.row_end] = view.image
            dist.all_reduce(images, group=self.group)
        return images


def _keep_in_graph(views: list[ViewRender], received: Tensor) -> None:
    """Tie an exchange's output to the loss even when nothing arrived, so every rank joins its backward."""
    views[0].image = views[0].image + 0.0 * received.sum()


def _rows_of(view: ViewRender, row_start: int, row_end: int) -> Tensor:
    """Image rows [row_start, row_end) (absolute pixel rows) of a view rendered here."""
    return view.image[row_start - view.row_start : row_end - view.row_start]


def _rows_by_rank(transfers: list[HaloTransfer], field: str, world_size: int) -> list[int]:
    """Pixel rows per peer rank (``field`` names which end of each transfer is the peer)."""
    rows = [0] * world_size
    for transfer in transfers:
        rows[getattr(transfer, field)] += transfer.row_end - transfer.row_start
    return rows


def _split_by_view(received: Tensor, received_counts: Tensor, views: int) -> list[Tensor]:
    """Rows per view: each source's block is ordered by view; concatenate the sources' pieces."""
    pieces: list[list[Tensor]] = [[] for _ in range(views)]
    offset = 0
    for source_counts in received_counts.tolist():
        for view, count in enumerate(source_counts):
            pieces[view].append(received[offset : offset + count])
            offset += count
    return [torch.cat(p) if p else received[:0] for p in pieces]

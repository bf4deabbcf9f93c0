"""Per-camera row costs for the pixel partitioner (Grendel's dynamic load balancer).

Costs measured when a camera was last rendered are reused the next time it is sampled (about an epoch
later); until then its rows cost the same. ``pairs`` counts splat-tile pairs in the rows each splat can
reach, deterministic and the same whichever rank renders a row; ``time`` uses measured rendering
time; ``off`` keeps uniform costs.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

BalanceMode = Literal["pairs", "time", "off"]


class LoadBalancer:
    """Remembers a cost per tile row for every camera id."""

    def __init__(self, mode: BalanceMode = "pairs") -> None:
        if mode not in ("pairs", "time", "off"):
            raise ValueError(f"load balancing mode must be 'pairs', 'time' or 'off', got {mode!r}")
        self.mode = mode
        self.costs: dict[int, Tensor] = {}

    def row_costs(self, camera_ids: Tensor | None, views: int, tiles_y: int) -> Tensor:
        """Costs [views * tiles_y] of the stacked tile rows of a batch (uniform where unknown)."""
        rows = []
        for view in range(views):
            known = None if camera_ids is None or self.mode == "off" else self.costs.get(int(camera_ids[view]))
            rows.append(known if known is not None and known.numel() == tiles_y else torch.ones(tiles_y))
        return torch.cat(rows).to(torch.float64)

    def record(self, camera_ids: Tensor | None, measured: Tensor) -> None:
        """Store measured costs [views, tiles_y] (identical on every rank). Rows that cost nothing still get
        a small floor, the fixed per-row overhead, so empty sky is not free."""
        if self.mode == "off" or camera_ids is None:
            return
        for view, camera_id in enumerate(camera_ids.tolist()):
            row = measured[view].to(torch.float64).cpu()
            floor = 0.01 * float(row.mean()) if float(row.mean()) > 0 else 1.0
            self.costs[int(camera_id)] = row.clamp_min(floor)

    def state_dict(self) -> dict[str, Tensor]:
        return {str(key): value for key, value in self.costs.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.costs = {int(key): value for key, value in state.items()}


def imbalance(part_costs: Tensor) -> float:
    """max / mean of the per-rank costs (1.0 is perfect balance)."""
    mean = float(part_costs.mean())
    return float(part_costs.max()) / mean if mean > 0 else 1.0

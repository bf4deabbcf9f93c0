"""Lorentz layers vs tangent-space layers, and one WN18RR epoch of the HyboNet KG model.

Side by side in one run (interleaved rounds, median per configuration), float32 and float64:
  * LorentzLinear vs ``expmap0(Linear(logmap0(x)))`` of the same shape, forward + backward;
  * LorentzMultiheadAttention vs ``expmap0(MultiheadAttention(logmap0(x)))``, forward + backward;
  * seconds per WN18RR training epoch of the KG model at the recipe's earlier settings (batch 2000,
    50 negatives), for the projection retraction and expmap + parallel transport (geoopt's default
    kind; the recipe now has HyboNet's settings, timed against HyboNet's code by ``hybonet_kg.py``).
The epoch comparison is extrapolated from a few steps per configuration in ABBA order; the full run
also times one complete epoch with the projection retraction, which is the ``kg_epoch_s`` RESULT.
``--quick`` (< 1 minute on an idle machine) uses fewer rounds and reports the extrapolated epoch.

    python benchmarks/hyperbolic.py [--quick] [--threads N] [--wn18rr PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import geoopt
import torch
import torch.nn.functional as F
from torch import nn

from lightning_grendel.hyperbolic.attention import LorentzMultiheadAttention
from lightning_grendel.hyperbolic.linear import LorentzLinear
from lightning_grendel.hyperbolic.manifold import LorentzManifold

DEFAULT_WN18RR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wn18rr"


class TangentLinear(nn.Module):
    """The usual hyperbolic-NN baseline: map to the tangent space at the origin, Linear, map back."""

    def __init__(self, manifold: LorentzManifold, d_in: int, d_out: int) -> None:
        super().__init__()
        self.manifold = manifold
        self.linear = nn.Linear(d_in - 1, d_out - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.manifold.logmap0(x)[..., 1:]
        v = self.linear(u)
        return self.manifold.expmap0(torch.cat([torch.zeros_like(v[..., :1]), v], dim=-1))


class TangentAttention(nn.Module):
    """Euclidean multi-head attention in the tangent space at the origin."""

    def __init__(self, manifold: LorentzManifold, d_model: int, heads: int) -> None:
        super().__init__()
        self.manifold = manifold
        self.attn = nn.MultiheadAttention(d_model - 1, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.manifold.logmap0(x)[..., 1:]
        v = self.attn(u, u, u, need_weights=False)[0]
        return self.manifold.expmap0(torch.cat([torch.zeros_like(v[..., :1]), v], dim=-1))


def fwd_bwd_time(layer: nn.Module, x, call: Callable, min_time: float) -> float:
    """Seconds per forward + backward, averaged over as many calls as fit in ``min_time``."""
    n, start = 0, time.perf_counter()
    while True:
        layer.zero_grad(set_to_none=True)
        call(layer, x).sum().backward()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / n


def compare(a: nn.Module, b: nn.Module, x, call_a: Callable, call_b: Callable, rounds: int,
            min_time: float) -> tuple[float, float]:
    for layer, call in ((a, call_a), (b, call_b)):  # warm-up
        fwd_bwd_time(layer, x, call, 0.05)
    ta, tb = [], []
    for _ in range(rounds):  # interleaved so that load changes hit both alike
        ta.append(fwd_bwd_time(a, x, call_a, min_time))
        tb.append(fwd_bwd_time(b, x, call_b, min_time))
    return statistics.median(ta), statistics.median(tb)


def kg_epoch_seconds(path: Path, retraction: str, max_steps: int | None) -> tuple[float, int]:
    """Wall seconds of one training epoch (extrapolated from ``max_steps`` steps when given)."""
    from lightning_grendel.hyperbolic.data.knowledge_graph import KnowledgeGraphDataModule
    from lightning_grendel.hyperbolic.nets.kg import HyboNetKG

    torch.manual_seed(0)
    dm = KnowledgeGraphDataModule(str(path), batch_size=2000, num_negatives=50)
    model = HyboNetKG(dm.num_entities, dm.num_relations, dim=32, retraction=retraction)
    opt = geoopt.optim.RiemannianAdam(model.parameters(), lr=0.01,
                                      stabilize=None if retraction == "projection" else 1)
    loader = dm.train_dataloader()
    steps_per_epoch = len(loader)
    times = []
    start = time.perf_counter()
    for i, batch in enumerate(loader):
        scores = model(batch["head"], batch["relation"], batch["tails"])
        target = torch.zeros_like(scores)
        target[:, 0] = 1.0
        loss = F.binary_cross_entropy_with_logits(scores, target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - start)
        if max_steps is not None and i + 1 >= max_steps:
            break
    if max_steps is None:
        return times[-1], steps_per_epoch
    per_step = (times[-1] - times[0]) / max(1, len(times) - 1)  # the first step includes warm-up
    return per_step * steps_per_epoch, steps_per_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced version, under a minute")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wn18rr", type=Path, default=DEFAULT_WN18RR)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds, min_time = (3, 0.15) if args.quick else (7, 0.5)
    rows = []
    for dtype in (torch.float32, torch.float64):
        m = LorentzManifold(1.0)
        x = m.random_normal(4096, 65, std=1.0).to(dtype)
        rows.append(("linear 4096x65->65", dtype) + compare(
            LorentzLinear(m, 65, 65).to(dtype), TangentLinear(m, 65, 65).to(dtype), x,
            lambda layer, x: layer(x), lambda layer, x: layer(x), rounds, min_time))
        # 4 heads of 16 coordinates each: Lorentz heads are 16-coordinate points (d_model 64), the tangent
        # layer attends over the 64 space coordinates of 65-coordinate points.
        seq = (m.random_normal(32, 32, 64, std=1.0).to(dtype), m.random_normal(32, 32, 65, std=1.0).to(dtype))
        rows.append(("attention 32x32, 4 heads x16", dtype) + compare(
            LorentzMultiheadAttention(m, 64, 4).to(dtype), TangentAttention(m, 65, 4).to(dtype), seq,
            lambda layer, x: layer(x[0], x[0], x[0]), lambda layer, x: layer(x[1]), rounds, min_time))

    print(f"\n{'layer (fwd+bwd)':<30} {'dtype':<8} {'Lorentz ms':>11} {'tangent ms':>11} {'tangent/Lorentz':>16}")
    for name, dtype, t_lorentz, t_tangent in rows:
        print(f"{name:<30} {str(dtype).replace('torch.', ''):<8} {t_lorentz * 1e3:>11.3f} {t_tangent * 1e3:>11.3f}"
              f" {t_tangent / t_lorentz:>16.2f}")

    kg: dict[str, float] = {}
    if args.wn18rr.is_dir():
        steps = 4 if args.quick else 20
        samples: dict[str, list[float]] = {"projection": [], "expmap": []}
        for retraction in ("projection", "expmap", "expmap", "projection"):  # ABBA against load drift
            sec, n_steps = kg_epoch_seconds(args.wn18rr, retraction, steps)
            samples[retraction].append(sec)
        kg = {r: statistics.mean(v) for r, v in samples.items()}
        print(f"\nWN18RR epoch, batch 2000, 50 negatives, dim 32 ({n_steps} steps; extrapolated from {steps} "
              "steps, ABBA order):")
        for retraction, sec in kg.items():
            print(f"  RiemannianAdam with {retraction:<10} retraction: {sec:8.2f} s/epoch")
        print(f"  expmap / projection: {kg['expmap'] / kg['projection']:.2f}")
        if not args.quick:
            kg["projection"], _ = kg_epoch_seconds(args.wn18rr, "projection", None)
            print(f"  one full measured epoch (batch 2000, projection): {kg['projection']:.2f} s")
    else:
        print(f"\nWN18RR not found at {args.wn18rr}: KG epoch not measured")

    speedup = statistics.median(t_tangent / t_lorentz for name, _, t_lorentz, t_tangent in rows if "linear" in name)
    print(f"RESULT hyperbolic.linear_speedup={speedup:.3f}")
    print(f"RESULT hyperbolic.kg_epoch_s={kg['projection'] if kg else float('nan'):.2f}")


if __name__ == "__main__":
    main()

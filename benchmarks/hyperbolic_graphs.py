"""Graph link prediction, side by side in one run: HyboNet's fully hyperbolic GCN against a Euclidean
GCN of the same width and depth on a generated Disease-like tree, and HyboNet on Cora (HyboNet's own
Cora script and the recipe's settings, over several edge splits).

Each model trains full batch with the LightningModule's own loss, negatives and optimiser
(``LorentzGCNLinkModule.link_loss`` / ``configure_optimizers``, grad-norm clip as in the recipes) in a
plain loop, validating every epoch; the test ROC-AUC and AP reported are those at the best validation
ROC-AUC (HGCN's and HyboNet's early-stopping rule); Cora runs stop after ``--patience`` epochs without
a better one, the tree runs train all their epochs. Both losses are run for both geometries on the
tree, so neither side is judged by a loss that suits only the other. Cora runs once per split seed
(split and initialisation both seeded).

    python benchmarks/hyperbolic_graphs.py [--tree-epochs 1000] [--cora-epochs 1500] [--seed 0]
        [--cora-seeds 1] [--cora-configs hybonet recipe] [--patience 300]
        [--disease PATH]   # optional: an HGCN-layout folder (e.g. HGCN's own disease_lp) measured too
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from lightning_grendel.hyperbolic.data.disease import generate_disease_like, write_hgcn_folder
from lightning_grendel.hyperbolic.data.hgcn import HGCNDataModule
from lightning_grendel.hyperbolic.data.planetoid import PlanetoidDataModule
from lightning_grendel.hyperbolic.modules.gcn import LorentzGCNLinkModule

CORA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cora"
# the recipes' settings (disease_lp.yaml; HyboNet's Cora script) and a BCE variant for the tree
TREE_CONFIGS = {
    "margin": dict(loss="margin", margin=30.0, lr=0.005, dropout=0.0, clip=0.5),
    "bce": dict(loss="bce", lr=0.01, dropout=0.0, clip=0.5),
}
# HyboNet's Cora script (one negative per edge) and cora_lp.yaml (more negatives per edge, see the docs)
CORA_CONFIGS = {
    "hybonet": dict(loss="margin", margin=0.1, lr=0.02, dropout=0.7, weight_decay=1e-3, clip=0.5),
    "recipe": dict(loss="margin", margin=0.1, lr=0.02, dropout=0.7, weight_decay=1e-3, num_negatives=10, clip=0.5),
}


def train(batch: dict, num_features: int, epochs: int, seed: int, clip: float, patience: int | None = None,
          **kwargs) -> dict[str, float]:
    """Best-validation ROC-AUC and the test ROC-AUC / AP at that epoch (stop ``patience`` epochs after it)."""
    torch.manual_seed(seed)
    module = LorentzGCNLinkModule(in_features=num_features, hidden=16, num_layers=2, **kwargs)
    opt = module.configure_optimizers()
    best = {"val_auc": -1.0}
    start = time.perf_counter()
    for epoch in range(epochs):
        module.train()
        opt.zero_grad()
        module.link_loss(batch).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        opt.step()
        module.eval()
        with torch.no_grad():
            val = binary_auroc(*module.link_scores(batch, "val")).item()
            if val > best["val_auc"]:
                scores, labels = module.link_scores(batch, "test")
                best = {"val_auc": val, "test_auc": binary_auroc(scores, labels).item(),
                        "test_ap": binary_average_precision(scores, labels).item(), "epoch": epoch}
            elif patience is not None and epoch - best["epoch"] >= patience:
                break
    best["seconds"] = time.perf_counter() - start
    return best


def report(prefix: str, result: dict[str, float]) -> None:
    print(f"RESULT hyperbolic.{prefix}_auc={result['test_auc']:.4f}")
    print(f"RESULT hyperbolic.{prefix}_ap={result['test_ap']:.4f}")
    print(f"  ({prefix}: best val ROC-AUC {result['val_auc']:.4f} at epoch {result['epoch']}, "
          f"{result['seconds']:.0f} s)", flush=True)


def tree_comparison(name: str, folder: Path, epochs: int, seed: int) -> None:
    dm = HGCNDataModule(str(folder), task="lp", seed=seed)
    print(f"{name}: {dm.batch['features'].shape[0]} nodes, {dm.num_features} features", flush=True)
    best = {}
    for loss, cfg in TREE_CONFIGS.items():
        for geometry in ("lorentz", "euclidean"):
            result = train(dm.batch, dm.num_features, epochs, seed, geometry=geometry, **cfg)
            report(f"{name}_lp_{loss}_{geometry}", result)
            if result["val_auc"] > best.get(geometry, {"val_auc": -1})["val_auc"]:
                best[geometry] = result
    for geometry, result in best.items():  # each geometry with the loss that validated better
        print(f"RESULT hyperbolic.{name}_lp_auc_{geometry}={result['test_auc']:.4f}")


def cora(path: Path, config: str, epochs: int, seeds: list[int], patience: int | None) -> None:
    """One run per split seed; per-seed results, then mean and (for several seeds) standard deviation."""
    aucs, aps = [], []
    for seed in seeds:
        dm = PlanetoidDataModule(str(path), link_prediction=True, seed=seed)
        result = train(dm.batch, dm.num_features, epochs, seed, patience=patience, **CORA_CONFIGS[config])
        report(f"cora_lp_{config}_seed{seed}", result)
        aucs.append(result["test_auc"])
        aps.append(result["test_ap"])
    for metric, values in (("auc", aucs), ("ap", aps)):
        print(f"RESULT hyperbolic.cora_lp_{config}_test_{metric}_mean={statistics.mean(values):.4f}")
        if len(values) > 1:
            print(f"RESULT hyperbolic.cora_lp_{config}_test_{metric}_std={statistics.stdev(values):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree-epochs", type=int, default=1000)
    parser.add_argument("--cora-epochs", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cora-seeds", type=int, default=1, help="Cora split seeds seed, seed+1, ...")
    parser.add_argument("--cora-configs", nargs="+", choices=sorted(CORA_CONFIGS), default=["hybonet", "recipe"])
    parser.add_argument("--patience", type=int, default=300,
                        help="Cora: stop after this many epochs without a better validation ROC-AUC")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cora", type=Path, default=CORA)
    parser.add_argument("--disease", type=Path, default=None)
    args = parser.parse_args()
    if args.cora_seeds < 1 or args.patience < 1:
        parser.error(f"--cora-seeds and --patience must be >= 1, got {args.cora_seeds} and {args.patience}")
    torch.set_num_threads(args.threads)
    if args.tree_epochs > 0:
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_hgcn_folder(Path(tmp) / "disease_lp", generate_disease_like(seed=args.seed))
            tree_comparison("tree", folder, args.tree_epochs, args.seed)
    if args.disease is not None and args.tree_epochs > 0:
        tree_comparison("disease", args.disease, args.tree_epochs, args.seed)
    if args.cora_epochs > 0:
        for config in args.cora_configs:
            cora(args.cora, config, args.cora_epochs, list(range(args.seed, args.seed + args.cora_seeds)),
                 args.patience)


if __name__ == "__main__":
    main()

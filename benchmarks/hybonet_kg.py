"""Seconds per WN18RR training epoch of HyboNet's own KG code against this project's recipe, in one run.

HyboNet (Chen et al., ACL 2022) publishes its knowledge-graph code in ``kg/`` of
https://github.com/chenweize1998/fully-hyperbolic-nn; it is no dependency of this project. Clone it
yourself and pass the clone (or its ``kg`` folder) with ``--hybonet`` or ``$HYBONET``; without one the
script says so and exits 0:

    git clone https://github.com/chenweize1998/fully-hyperbolic-nn /tmp/fully-hyperbolic-nn
    python benchmarks/hybonet_kg.py --hybonet /tmp/fully-hyperbolic-nn [--data ../shared/data/wn18rr] [--epochs 10]

Both train on the same WN18RR files with the settings of HyboNet's ``run.wn18rr.32.sh``, which the
``hyperbolic/wn18rr`` recipe uses too: dim 32, batch 1000, 50 filtered negatives, RiemannianAdam lr
0.005 (expmap, stabilize 1), margin 8, max_norm 1.5, max_scale 3.5, gradient-norm clip 1; each for
``--epochs`` epochs and one validation after the last. The runs alternate (HyboNet, ours, then ours,
HyboNet, ...), each in a fresh process with ``--threads`` threads; round r seeds both with the
recipe's seed (40, HyboNet's) plus r, so the validation metrics are means over ``--rounds`` seeds.
An epoch is timed from its start to the next one's (to the validation after the last), so it covers
the data pipeline and, for this project, Lightning; the per-run median over epochs 2.. is taken,
then the median over runs.

HyboNet's script is run unmodified, imported from its folder, with three shims that change no
computation: ``.cuda()`` returns the tensor or module itself (the script calls it unconditionally;
here everything stays on the CPU), ``geoopt.utils.copy_or_set_`` is supplied (HyboNet's ``optim``
imports it; geoopt 0.5 removed it), and its ``tqdm`` progress bar is replaced by one that records
when each epoch starts. Validation is scored twice for both models: standard filtered ranking, and
HyboNet's (which also removes the query's head entity from the candidates) by this project's
evaluator; HyboNet's own ``evaluate`` also runs on its model, a check of that evaluator.

``--profile`` times the stages of one training step of this project's model (data, forward, backward,
gradient clipping, optimiser step), with its C++ kernels and with their PyTorch references (the
optimiser's reference path is geoopt's algorithm through the manifold's methods; the clipping's is
torch's ``clip_grad_norm_``), CPU time, median over ``--profile-steps`` steps.

``--checkpoint`` scores a checkpoint of ``lightning-grendel fit -c hyperbolic/wn18rr`` on the test
split (``RESULT hybonet_kg.test_mrr``, standard filtered, and ``hybonet_kg.test_mrr_hybonet``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402 - the OpenMP policy is read when torch loads
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wn18rr"
RECIPE = REPO / "lightning_grendel" / "recipes" / "hyperbolic" / "wn18rr.yaml"
CLONE_HINT = ("git clone https://github.com/chenweize1998/fully-hyperbolic-nn /tmp/fully-hyperbolic-nn, then "
              "--hybonet /tmp/fully-hyperbolic-nn")
HYBONET_FILES = ("main.py", "LorentzModel.py", "load_data.py", "manifolds/lorentz.py", "optim/radam.py")


def find_hybonet(given: str | None) -> Path | None:
    """HyboNet's ``kg`` folder from ``--hybonet`` or ``$HYBONET`` (a clone or its ``kg``); None when neither."""
    name = given or os.environ.get("HYBONET")
    if not name:
        return None
    for folder in (Path(name) / "kg", Path(name)):
        if all((folder / f).is_file() for f in HYBONET_FILES):
            return folder.resolve()
    source = "--hybonet" if given else "$HYBONET"
    raise SystemExit(f"{source}: {name} holds no HyboNet KG code (kg/{', kg/'.join(HYBONET_FILES)}); {CLONE_HINT}")


def recipe_settings() -> dict:
    """The model, data and trainer settings of the ``hyperbolic/wn18rr`` recipe."""
    recipe = yaml.safe_load(RECIPE.read_text())
    return {"seed": recipe["seed_everything"], "model": recipe["model"]["init_args"],
            "data": recipe["data"]["init_args"], "clip": recipe["trainer"]["gradient_clip_val"]}


def epoch_seconds(stamps: list[float]) -> list[float]:
    """Durations between consecutive time stamps (epoch starts, then the start of the validation)."""
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def ranking_metrics(score_all, queries: torch.Tensor, true_tails, batch: int) -> dict[str, float]:
    """Standard filtered MRR/Hits and HyboNet's (head removed too) of ``score_all(head, relation) -> (B, N)``."""
    from lightning_grendel.hyperbolic.modules.kg import filtered_ranks

    standard, hybonet = [], []
    with torch.no_grad():
        for start in range(0, len(queries), batch):
            q = queries[start:start + batch]
            rows, cols = true_tails.filter_coo(q[:, 0].numpy(), q[:, 1].numpy(), q[:, 2].numpy())
            ranks = filtered_ranks(score_all(q[:, 0], q[:, 1]).float(), q[:, 2], torch.from_numpy(rows),
                                   torch.from_numpy(cols), q[:, 0])
            standard.append(ranks[0])
            hybonet.append(ranks[1])
    out = {}
    for name, ranks in (("", torch.cat(standard).double()), ("hybonet_", torch.cat(hybonet).double())):
        out[f"{name}mrr"] = (1.0 / ranks).mean().item()
        for n in (1, 3, 10):
            out[f"{name}hits@{n}"] = (ranks <= n).double().mean().item()
    return out


def child_hybonet(kg: Path, data: Path, epochs: int, settings: dict, seed: int) -> dict:
    """Train with HyboNet's ``main.Experiment`` for ``epochs`` epochs; epoch times and validation metrics."""
    import geoopt.utils
    import numpy as np

    from lightning_grendel.hyperbolic.data.knowledge_graph import KnowledgeGraph, TrueTails

    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # the script calls .cuda() unconditionally
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    if not hasattr(geoopt.utils, "copy_or_set_"):  # removed in geoopt 0.5, imported by HyboNet's optim
        def copy_or_set_(dest: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
            return dest.set_(source) if dest.stride() != source.stride() else dest.copy_(source)
        geoopt.utils.copy_or_set_ = copy_or_set_
    sys.path.insert(0, str(kg))
    import main as hybonet  # HyboNet's kg/main.py; its __main__ block does not run on import

    model, data_args = settings["model"], settings["data"]
    np.random.seed(seed)  # what its __main__ does (with 40) before building the data and the model
    torch.manual_seed(seed)
    hybonet.d = hybonet.Data(data_dir=f"{data}/")
    stamps: list[float] = []
    cpu: list[float] = []
    result: dict = {}

    class EpochClock:  # stands in for tqdm(range(...)): a time stamp as each epoch starts
        def __init__(self, iterable, **kwargs):
            self.iterable = iterable

        def __iter__(self):
            for item in self.iterable:
                stamps.append(time.perf_counter())
                cpu.append(time.process_time())
                yield item

        def set_description(self, *args, **kwargs):
            pass

    hybonet.tqdm = EpochClock
    own_evaluate = hybonet.Experiment.evaluate

    class Done(Exception):
        pass

    def evaluate(self, net, split, batch=30):  # called once, on valid, after the last epoch
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        graph = KnowledgeGraph.load(data)
        queries = torch.from_numpy(graph.valid)
        every = torch.arange(graph.num_entities)

        def score_all(head, relation):  # HyboNet's own forward against every entity
            return net.forward(head, relation, every.repeat(len(head), 1))

        # this project's vocabulary and HyboNet's agree (sorted entity names); relations are mapped by name
        relation_ids = torch.tensor([hybonet.d.relation2id[r] for r in graph.relations]
                                    + [hybonet.d.relation2id[f"{r}_reverse"] for r in graph.relations])
        assert graph.entities == hybonet.d.entities, "entity vocabularies differ"
        result["valid"] = ranking_metrics(lambda h, r: score_all(h, relation_ids[r]), queries, TrueTails(graph), 32)
        hits10, hits3, hits1, mrr = own_evaluate(self, net, split, batch)
        result["hybonet_evaluate"] = {"mrr": float(mrr), "hits@1": float(hits1), "hits@3": float(hits3),
                                      "hits@10": float(hits10)}
        raise Done

    hybonet.Experiment.evaluate = evaluate
    args = argparse.Namespace(max_norm=model["max_norm"], max_scale=model["max_scale"], margin=model["margin"])
    experiment = hybonet.Experiment(
        args, learning_rate=model["lr"], dim=model["dim"], nneg=data_args["num_negatives"], valid_steps=epochs,
        num_epochs=epochs, batch_size=data_args["batch_size"], max_norm=settings["clip"],
        max_grad_norm=settings["clip"], optimizer="radam", cuda=True, early_stop=10**9, real_neg=True)
    try:
        experiment.train_and_eval()
    except Done:
        pass
    return {**result, "epoch_s": epoch_seconds(stamps), "epoch_cpu_s": epoch_seconds(cpu)}


def child_ours(data: Path, epochs: int, settings: dict, seed: int) -> dict:
    """Train the recipe's LorentzKGModule for ``epochs`` epochs with Lightning; epoch times and validation."""
    import lightning as L

    from lightning_grendel.hyperbolic.data.knowledge_graph import KnowledgeGraphDataModule
    from lightning_grendel.hyperbolic.modules.kg import LorentzKGModule

    stamps: list[float] = []
    cpu: list[float] = []

    class EpochClock(L.Callback):
        def _stamp(self, *args) -> None:
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())

        on_train_epoch_start = _stamp
        on_validation_start = _stamp

    L.seed_everything(seed, verbose=False)
    datamodule = KnowledgeGraphDataModule(**{**settings["data"], "path": str(data), "seed": seed})
    module = LorentzKGModule(**settings["model"])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, check_val_every_n_epoch=epochs,
                        gradient_clip_val=settings["clip"], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[EpochClock()])
    trainer.fit(module, datamodule)
    metrics = {k.removeprefix("val/"): v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return {"valid": metrics, "epoch_s": epoch_seconds(stamps), "epoch_cpu_s": epoch_seconds(cpu)}


def run_child(which: str, args: argparse.Namespace, kg: Path, seed: int) -> dict:
    """One training run in a fresh process (``--threads`` threads); its JSON result."""
    with tempfile.TemporaryDirectory(prefix="hybonet_kg_") as out:
        result = Path(out) / "result.json"
        command = [sys.executable, __file__, "--child", which, "--child-out", str(result), "--hybonet", str(kg),
                   "--data", str(args.data), "--epochs", str(args.epochs), "--threads", str(args.threads),
                   "--child-seed", str(seed)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=out)
        if done.returncode != 0:
            tail = f"{done.stdout[-3000:]}{done.stderr[-3000:]}"
            raise SystemExit(f"the {which} run failed (exit {done.returncode}):\n{tail}")
        return json.loads(result.read_text())


STAGES = ("data", "forward", "backward", "clip", "optimizer")


def stage_milliseconds(data: Path, kernels: bool, steps: int) -> dict[str, float]:
    """Median CPU milliseconds of each stage of a training step of the recipe's model and optimiser."""
    import torch.nn.functional as F

    from lightning_grendel.hyperbolic import cpp
    from lightning_grendel.hyperbolic.clip import clip_grad_norm_
    from lightning_grendel.hyperbolic.data.knowledge_graph import KnowledgeGraphDataModule
    from lightning_grendel.hyperbolic.nets.kg import HyboNetKG
    from lightning_grendel.hyperbolic.optim import LorentzRiemannianAdam

    settings = recipe_settings()
    model_args, data_args = settings["model"], {**settings["data"], "path": str(data)}
    load = cpp.load
    if not kernels:  # every kernel "fails to build": the PyTorch references run
        cpp.load = lambda extension: None
    try:
        torch.manual_seed(0)
        datamodule = KnowledgeGraphDataModule(**data_args)
        model = HyboNetKG(datamodule.num_entities, datamodule.num_relations, model_args["dim"], model_args["k"],
                          model_args["max_norm"], model_args["max_scale"], model_args["margin"],
                          model_args["retraction"])
        optimizer = LorentzRiemannianAdam(model.parameters(), lr=model_args["lr"], stabilize=model_args["stabilize"],
                                          kernel=kernels)
        batches = iter(datamodule.train_dataloader())
        times: dict[str, list[float]] = {stage: [] for stage in STAGES}
        for step in range(steps + 3):  # 3 untimed warm-up steps
            marks = [time.process_time()]
            batch = next(batches)
            marks.append(time.process_time())
            scores = model(batch["head"], batch["relation"], batch["tails"])
            targets = torch.zeros_like(scores)
            targets[:, 0] = 1.0
            loss = F.binary_cross_entropy_with_logits(scores, targets)
            marks.append(time.process_time())
            optimizer.zero_grad()
            loss.backward()
            marks.append(time.process_time())
            (clip_grad_norm_ if kernels else torch.nn.utils.clip_grad_norm_)(model.parameters(), settings["clip"])
            marks.append(time.process_time())
            optimizer.step()
            marks.append(time.process_time())
            if step >= 3:
                for stage, start, end in zip(STAGES, marks, marks[1:], strict=False):
                    times[stage].append(1e3 * (end - start))
    finally:
        cpp.load = load
    return {stage: statistics.median(values) for stage, values in times.items()}


def score_checkpoint(path: Path, data: Path) -> dict[str, float]:
    """Test-split metrics of a ``hyperbolic/wn18rr`` checkpoint (both ranking protocols)."""
    import lightning as L

    from lightning_grendel.hyperbolic.data.knowledge_graph import KnowledgeGraphDataModule
    from lightning_grendel.hyperbolic.modules.kg import LorentzKGModule

    module = LorentzKGModule.load_from_checkpoint(str(path), map_location="cpu", weights_only=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.test(module, KnowledgeGraphDataModule(path=str(data), **{k: v for k, v in recipe_settings()["data"].items()
                                                                      if k != "path"}), verbose=False)
    return {k.removeprefix("test/"): v.item() for k, v in trainer.callback_metrics.items() if k.startswith("test/")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hybonet", help="a clone of fully-hyperbolic-nn or its kg folder (default: $HYBONET)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="WN18RR folder (train/valid/test.txt)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs per run (validation after the last)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each, alternating (medians reported)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint", type=Path, help="also score this hyperbolic/wn18rr checkpoint on test")
    parser.add_argument("--profile", action="store_true", help="also time a training step's stages")
    parser.add_argument("--profile-steps", type=int, default=30)
    parser.add_argument("--child", choices=["hybonet", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not all((args.data / f"{s}.txt").is_file() for s in ("train", "valid", "test")):
        raise SystemExit(f"--data: {args.data} lacks train.txt, valid.txt or test.txt")
    if args.epochs < 3:
        raise SystemExit(f"--epochs must be at least 3 (the first epoch is warm-up), got {args.epochs}")
    torch.set_num_threads(args.threads)
    if args.child:
        settings = recipe_settings()
        if args.child == "hybonet":
            result = child_hybonet(Path(args.hybonet), args.data, args.epochs, settings, args.child_seed)
        else:
            result = child_ours(args.data, args.epochs, settings, args.child_seed)
        args.child_out.write_text(json.dumps(result))
        return

    if args.profile:
        for kernels in (True, False):
            ms = stage_milliseconds(args.data, kernels, args.profile_steps)
            name = "C++ kernels" if kernels else "PyTorch references"
            print(f"step stages, {name:18s} (CPU ms, median of {args.profile_steps}): " +
                  ", ".join(f"{stage} {ms[stage]:.1f}" for stage in STAGES) + f"; total {sum(ms.values()):.1f}")
            print(f"RESULT hybonet_kg.step_ms_{'kernels' if kernels else 'references'}={sum(ms.values()):.1f}")
    if args.checkpoint is not None:
        test = score_checkpoint(args.checkpoint, args.data)
        print(f"test split, {args.checkpoint}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(test.items())))
        print(f"RESULT hybonet_kg.test_mrr={test['mrr']:.4f}")
        print(f"RESULT hybonet_kg.test_mrr_hybonet={test['hybonet_mrr']:.4f}")
    kg = find_hybonet(args.hybonet)
    if kg is None:
        print(f"SKIP hybonet_kg: no HyboNet code (pass --hybonet PATH or set $HYBONET; {CLONE_HINT})")
        return
    settings = recipe_settings()
    print(f"HyboNet KG code: {kg}; data: {args.data}; {args.epochs} epochs per run, {args.rounds} rounds, "
          f"{args.threads} thread(s); settings: {settings}", flush=True)
    runs: dict[str, list[dict]] = {"hybonet": [], "ours": []}
    for round_ in range(args.rounds):
        order = ("hybonet", "ours") if round_ % 2 == 0 else ("ours", "hybonet")
        for which in order:
            result = run_child(which, args, kg, settings["seed"] + round_)
            runs[which].append(result)
            epochs = ", ".join(f"{s:.2f}" for s in result["epoch_s"])
            print(f"  round {round_} (seed {settings['seed'] + round_}): {which:8s} s/epoch [{epochs}]; valid " +
                  ", ".join(f"{k} {v:.4f}" for k, v in sorted(result["valid"].items())), flush=True)
            if which == "hybonet":
                print("            HyboNet's own evaluate on its model: " +
                      ", ".join(f"{k} {v:.4f}" for k, v in sorted(result["hybonet_evaluate"].items())), flush=True)
    summary = {}
    for which, results in runs.items():
        wall = statistics.median(statistics.median(r["epoch_s"][1:]) for r in results)
        cpu = statistics.median(statistics.median(r["epoch_cpu_s"][1:]) for r in results)
        valid = {k: statistics.mean(r["valid"][k] for r in results) for k in results[0]["valid"]}
        summary[which] = (wall, cpu, valid)
        print(f"{which:8s}: {wall:.2f} s/epoch wall, {cpu:.2f} s/epoch CPU; valid after {args.epochs} epochs "
              f"(mean of {len(results)}): " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(valid.items())))
    (hy_wall, hy_cpu, hy_valid), (our_wall, our_cpu, our_valid) = summary["hybonet"], summary["ours"]
    print(f"RESULT hybonet_kg.hybonet_epoch_s={hy_wall:.3f}")
    print(f"RESULT hybonet_kg.epoch_s={our_wall:.3f}")
    print(f"RESULT hybonet_kg.epoch_speedup={hy_wall / our_wall:.2f}")
    print(f"RESULT hybonet_kg.epoch_cpu_speedup={hy_cpu / our_cpu:.2f}")
    for name in ("mrr", "hybonet_mrr"):
        print(f"RESULT hybonet_kg.valid_{name}_gap={our_valid[name] - hy_valid[name]:+.4f}")


if __name__ == "__main__":
    main()

"""Randomised fault injection into 3DGS training: does every fault end in a clear error or a recovery?

Each trial injects one fault, of a kind taken in turn and placed at random (seeded), into a small run on
the demo scene exported in the NeRF-synthetic layout; every run is a subprocess with a wall-clock limit.
Kinds: ``kill_at_step`` / ``stop_rank`` (SIGKILL / SIGSTOP one rank of a 2-rank GrendelStrategy fit at a
random step), ``kill_during_save`` (SIGKILL one rank inside a random save: writing its shard, rank 0
before meta.pt, or right after the directory swap), ``corrupt_checkpoint`` / ``corrupt_input`` (flip a
random bit of a committed sharded checkpoint / of a dataset file, then load), ``nan_pose`` (a NaN, inf,
``"identity"``, singular or scaled pose, or a NaN field of view, in one frame). After a kill or stop the
run must end, ``last.ckpt`` must be exactly a save the run recorded (step, Gaussian count, finite) and a
resumed fit must finish with a finite PLY. Outcomes (defined in docs/reliability.md): clear_error,
recovered, tolerated, altered_input, unclear_error, hang, silent.

    python benchmarks/faults.py --trials 50      # the full run (prints the table and RESULT lines)
    python benchmarks/faults.py --quick          # 4 trials: a save kill and the three cheap kinds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

WALL_LIMIT_S = 150
COLLECTIVE_TIMEOUT_S = 5
STEPS = 5
OUTCOMES = ("clear_error", "recovered", "tolerated", "altered_input", "unclear_error", "hang", "silent")
KINDS = ("kill_at_step", "kill_during_save", "stop_rank", "corrupt_checkpoint", "corrupt_input", "nan_pose")


# --- the worker side: runs in a subprocess ------------------------------------------------------------


def export_demo_scene(root: Path) -> None:
    """The demo scene (32 px: two tile rows for two ranks; 8 training views) as transforms_*.json plus PNGs."""
    import torch
    from PIL import Image

    from lightning_grendel.splatting.data.demo_scene import make_demo_scene

    scene = make_demo_scene(image_width=32, num_train=8, num_val=1, num_test=2, num_points=10)
    root.mkdir(parents=True, exist_ok=True)
    for split, data in (("train", scene.train), ("test", scene.test)):
        frames = []
        for i in range(len(data)):
            name = f"{split}_{i}"
            Image.fromarray(data.images[i].numpy()).save(root / f"{name}.png")
            c2w = torch.linalg.inv(data.cameras.world_to_camera[i].double())
            c2w[:3, 1:3] *= -1  # OpenCV -> OpenGL axes, as Blender writes them
            frames.append({"file_path": f"./{name}", "transform_matrix": c2w.tolist()})
        fx = float(data.cameras.intrinsics[0, 0, 0])
        fov = 2 * math.atan(0.5 * data.cameras.width / fx)
        (root / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": fov, "frames": frames}))


class Faults(Callback):
    """Injects one fault on one rank and records every save (step, Gaussian count) for the harness."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec, self.saves = spec, 0

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        kind, rank, step = self.spec.get("kind"), self.spec.get("rank"), self.spec.get("step")
        if kind in ("kill_at_step", "stop_rank") and trainer.global_rank == rank and trainer.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL if kind == "kill_at_step" else signal.SIGSTOP)

    def on_save_checkpoint(self, trainer: Any, module: Any, checkpoint: dict[str, Any]) -> None:
        count = module.global_gaussian_count()  # a collective: every rank saves
        if trainer.global_rank == 0:
            with open(self.spec["record"], "a") as log:
                log.write(json.dumps({"step": checkpoint["global_step"], "count": count}) + "\n")
        self.saves += 1
        spec = self.spec
        chosen = spec.get("kind") == "kill_during_save" and self.saves == spec["save"]
        if chosen and trainer.global_rank == spec["rank"]:
            die_inside_the_save(spec["point"])


def die_inside_the_save(point: str) -> None:
    """SIGKILL this process at ``point`` of the save about to start (the stall-and-kill hook)."""
    from lightning_grendel.splatting.grendel import checkpoint as ckpt

    if point == "swap":
        exchange, rename = ckpt.exchange_directories, os.rename

        def exchange_then_die(first: Path, second: Path) -> bool:  # swapped, the old copy not yet removed
            exchanged = exchange(first, second)
            if exchanged:
                os.kill(os.getpid(), signal.SIGKILL)
            return exchanged

        def rename_then_die(source: Any, target: Any) -> None:  # without renameat2: between the two renames
            rename(source, target)
            os.kill(os.getpid(), signal.SIGKILL)

        ckpt.exchange_directories, ckpt.os.rename = exchange_then_die, rename_then_die
        return
    save, calls = ckpt.atomic_torch_save, [0]

    def die_while_writing(obj: Any, path: Path) -> str:
        calls[0] += 1
        if point == "shard" or calls[0] == 2:  # rank 0's second file of a save is meta.pt
            Path(f"{path}.half.tmp").write_bytes(b"\0" * 100)
            os.kill(os.getpid(), signal.SIGKILL)
        return save(obj, path)

    ckpt.atomic_torch_save = die_while_writing


def worker_fit(spec: dict[str, Any]) -> None:
    """A small fit on ``spec['data']``, on 1 or 2 ranks, checkpointing every step; writes the PLY."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
    from lightning_grendel.splatting.densify import DensifyConfig
    from lightning_grendel.splatting.grendel import GrendelStrategy
    from lightning_grendel.splatting.module import GaussianSplattingModule

    ranks = spec.get("ranks", 1)
    strategy = (GrendelStrategy(start_method="spawn", timeout_s=COLLECTIVE_TIMEOUT_S, rasterizer_backend="torch")
                if ranks > 1 else "auto")
    densify = DensifyConfig(start_images=1, every_images=2)  # the Gaussian count changes between saves
    module = GaussianSplattingModule(sh_degree=0, backend="torch", densify=densify)
    data = GaussianSplattingDataModule(path=spec["data"], format="blender", num_init_points=120)
    callbacks: list[Callback] = [Faults(spec)]
    if spec.get("ckpt"):
        callbacks.append(ModelCheckpoint(dirpath=spec["ckpt"], save_last=True, save_top_k=0, every_n_train_steps=1))
    trainer = Trainer(accelerator="cpu", devices=ranks, strategy=strategy, max_steps=spec["steps"],
                      limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                      logger=CSVLogger(spec["out"], name="run"), callbacks=callbacks,
                      enable_checkpointing=bool(spec.get("ckpt")))
    trainer.fit(module, data, ckpt_path=spec.get("resume"))


def worker_load(spec: dict[str, Any]) -> None:
    """Load a (damaged) sharded checkpoint as every rank of 2 and of 1 would; compare with the clean one."""
    import torch

    from lightning_grendel.splatting import module  # noqa: F401 - registers DensifyConfig for weights_only loads
    from lightning_grendel.splatting.grendel.checkpoint import load_sharded

    def rows(directory: str) -> dict[str, torch.Tensor]:
        result: dict[str, torch.Tensor] = {}
        for world in (2, 1):
            for rank in range(world):
                state = load_sharded(Path(directory), rank, world)
                for key, value in state["state_dict"].items():
                    result[f"{world}/{key}"] = torch.cat([result.get(f"{world}/{key}", value[:0]), value])
                result[f"{world}/step{rank}"] = torch.tensor(state["global_step"])
        return result

    clean, damaged = rows(spec["clean"]), rows(spec["damaged"])
    same = clean.keys() == damaged.keys() and all(torch.equal(clean[k], damaged[k]) for k in clean)
    print("LOADED", "same" if same else "different")


def worker_scene(spec: dict[str, Any]) -> None:
    """Load a (damaged) dataset and compare with the clean one; if it differs, fit on it and check finite."""
    import torch

    from lightning_grendel.splatting.data.blender import load_blender_scene

    clean, damaged = (load_blender_scene(spec[k], num_init_points=10) for k in ("clean", "damaged"))
    same = all(
        torch.equal(getattr(clean, s).images, getattr(damaged, s).images)
        and torch.equal(getattr(clean, s).cameras.world_to_camera, getattr(damaged, s).cameras.world_to_camera)
        and torch.equal(getattr(clean, s).cameras.intrinsics, getattr(damaged, s).cameras.intrinsics)
        for s in ("train", "test")
    )
    print("LOADED", "same" if same else "different")
    if not same:
        worker_fit({"data": spec["damaged"], "steps": 2, "out": spec["out"], "record": spec["record"]})


# --- the harness side ----------------------------------------------------------------------------------


def run_worker(mode: str, spec: dict[str, Any]) -> tuple[int | None, str]:
    """(exit code or None on a hang, stdout + stderr); the whole process group is killed on a hang."""
    command = [sys.executable, __file__, "--worker", mode, json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=WALL_LIMIT_S)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return None, output


def flip_random_bit(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    where = rng.randrange(len(data))
    data[where] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"{path.name}@{where}"


def ply_is_finite(out: Path) -> bool | None:
    import torch

    from lightning_grendel.splatting.ply import load_ply

    plies = sorted(out.glob("run/version_*/point_cloud.ply"))
    if not plies:
        return None
    try:
        return all(torch.isfinite(v).all() for v in load_ply(plies[-1]).values())
    except ValueError:  # load_ply refuses non-finite rows
        return False


def names_the_problem(output: str, words: list[str]) -> bool:
    return any(word in output[-6000:] for word in words)


def check_committed(ckpt: Path, record: Path) -> tuple[bool, int, str]:
    """(ok, step, detail): ok when last.ckpt is exactly a recorded save (same count) with finite Gaussians."""
    import torch

    from lightning_grendel.splatting import module  # noqa: F401 - registers DensifyConfig for weights_only loads
    from lightning_grendel.splatting.grendel.checkpoint import load_sharded

    saves = {}
    for line in record.read_text().splitlines() if record.is_file() else []:
        entry = json.loads(line)
        saves[entry["step"]] = entry["count"]
    states = [load_sharded(ckpt / "last.ckpt", rank, 2) for rank in range(2)]
    step = int(states[0]["global_step"])
    count = sum(int(s["state_dict"]["gaussians.means"].shape[0]) for s in states)
    finite = all(torch.isfinite(v).all() for s in states for k, v in s["state_dict"].items() if "gaussians" in k)
    detail = f"last.ckpt: step {step}, {count} Gaussians (recorded {saves.get(step)}), finite={finite}"
    return saves.get(step) == count and finite, step, detail


def trial_distributed(kind: str, rng: random.Random, work: Path, data: Path) -> tuple[str, str]:
    from lightning_grendel.splatting.grendel.checkpoint import load_sharded

    rank = rng.randrange(2)
    spec: dict[str, Any] = {"kind": kind, "rank": rank, "data": str(data), "ranks": 2, "steps": STEPS,
                            "ckpt": str(work / "ckpt"), "out": str(work / "out"), "record": str(work / "saves.jsonl")}
    if kind == "kill_during_save":
        point = rng.choice(["shard", "meta", "swap"])
        spec.update(point=point, save=rng.randrange(2, STEPS), rank=0 if point in ("meta", "swap") else rank)
        where = f"rank {spec['rank']} in save {spec['save']} ({point})"
    else:
        spec["step"] = rng.randrange(2, STEPS)
        where = f"rank {rank} at step {spec['step']}"
    code, output = run_worker("fit", spec)
    if code is None:
        return "hang", where
    if code == 0:
        return "unclear_error", where + ": the faulty run exited 0"
    try:
        ok, step, detail = check_committed(work / "ckpt", work / "saves.jsonl")
    except (FileNotFoundError, RuntimeError) as error:  # the left-over directory is refused: is it said clearly?
        clear = "last.ckpt" in str(error)
        return ("clear_error" if clear else "unclear_error"), f"{where}: {type(error).__name__}: {error}"[:300]
    if not ok:
        return "silent", f"{where}: {detail}"
    resume = {**spec, "kind": None, "resume": str(work / "ckpt" / "last.ckpt"), "out": str(work / "resumed")}
    code, output = run_worker("fit", resume)
    if code is None:
        return "hang", where + ": the resumed run"
    if code != 0:
        return "unclear_error", f"{where}: resume failed: {output[-300:]}"
    load_sharded(work / "ckpt" / "last.ckpt", 0, 1)  # the resumed run's own saves are whole too
    finite = ply_is_finite(work / "resumed")
    return ("recovered", f"{where}: resumed from {detail}") if finite else ("silent", where + ": non-finite PLY")


def trial_corrupt_checkpoint(rng: random.Random, work: Path, clean: Path) -> tuple[str, str]:
    damaged = work / "damaged.ckpt"
    shutil.copytree(clean, damaged)
    target = rng.choice(sorted(p for p in damaged.iterdir() if p.is_file()))
    where = flip_random_bit(target, rng)
    code, output = run_worker("load", {"clean": str(clean), "damaged": str(damaged)})
    if code is None:
        return "hang", where
    if code == 0:
        return ("tolerated" if "LOADED same" in output else "silent"), where
    return ("clear_error" if names_the_problem(output, [str(damaged)]) else "unclear_error"), where


def trial_corrupt_input(rng: random.Random, work: Path, data: Path) -> tuple[str, str]:
    damaged = work / "scene"
    shutil.copytree(data, damaged)
    files = sorted(damaged.glob("*.json")) if rng.random() < 0.5 else sorted(damaged.glob("*.png"))
    target = rng.choice(files)
    where = flip_random_bit(target, rng)
    spec = {"clean": str(data), "damaged": str(damaged), "out": str(work / "out"), "record": str(work / "r.jsonl")}
    code, output = run_worker("scene", spec)
    if code is None:
        return "hang", where
    if code != 0:
        return ("clear_error" if names_the_problem(output, [str(target)]) else "unclear_error"), where
    if "LOADED same" in output:
        return "tolerated", where
    return ("altered_input" if ply_is_finite(work / "out") else "silent"), where


POSES = ("nan", "inf", "identity", "singular", "scaled", "nan_fov")


def trial_nan_pose(rng: random.Random, work: Path, data: Path) -> tuple[str, str]:
    damaged = work / "scene"
    shutil.copytree(data, damaged)
    path = damaged / "transforms_train.json"
    meta = json.loads(path.read_text())
    frame, how = rng.randrange(len(meta["frames"])), rng.choice(POSES)
    matrix = meta["frames"][frame]["transform_matrix"]
    if how in ("nan", "inf"):
        matrix[rng.randrange(3)][rng.randrange(4)] = float(how)
    elif how == "identity":
        meta["frames"][frame]["transform_matrix"] = "identity"
    elif how == "singular":
        matrix[2][:3] = [0.0, 0.0, 0.0]
    elif how == "scaled":
        for row in matrix[:3]:
            row[:3] = [2.0 * v for v in row[:3]]
    else:
        meta["camera_angle_x"] = float("nan")
    path.write_text(json.dumps(meta))
    where = f"{how} in frame {frame}"
    spec = {"data": str(damaged), "steps": 2, "out": str(work / "out"), "record": str(work / "r.jsonl")}
    code, output = run_worker("fit", spec)
    if code is None:
        return "hang", where
    if code == 0:
        return ("silent" if not ply_is_finite(work / "out") else "unclear_error"), where + ": accepted"
    clear = names_the_problem(output, [f"{path}: frame {frame}", f"{path}: camera_angle_x"])
    return ("clear_error" if clear else "unclear_error"), where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=50, help="number of trials (kinds cycle, places are random)")
    parser.add_argument("--quick", action="store_true", help="4 trials: a save kill and the cheap kinds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        {"fit": worker_fit, "load": worker_load, "scene": worker_scene}[args.worker[0]](json.loads(args.worker[1]))
        return
    kinds = (["kill_during_save", "corrupt_checkpoint", "corrupt_input", "nan_pose"] if args.quick
             else [KINDS[i % len(KINDS)] for i in range(args.trials)])
    rng = random.Random(args.seed)
    table: dict[str, Counter] = {kind: Counter() for kind in KINDS}
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        root = Path(tmp)
        data = root / "demo_blender"
        export_demo_scene(data)
        clean_ckpt = root / "base" / "last.ckpt"
        if "corrupt_checkpoint" in kinds:
            base = {"data": str(data), "ranks": 2, "steps": 3, "ckpt": str(root / "base"),
                    "out": str(root / "base_out"), "record": str(root / "base.jsonl")}
            code, output = run_worker("fit", base)
            if code != 0:
                raise SystemExit(f"the clean 2-rank run failed:\n{output[-3000:]}")
        for index, kind in enumerate(kinds):
            (work := root / f"trial_{index}").mkdir()
            start = time.monotonic()
            if kind == "corrupt_checkpoint":
                outcome, detail = trial_corrupt_checkpoint(rng, work, clean_ckpt)
            else:
                trial = {"corrupt_input": trial_corrupt_input, "nan_pose": trial_nan_pose}.get(kind)
                outcome, detail = trial(rng, work, data) if trial else trial_distributed(kind, rng, work, data)
            table[kind][outcome] += 1
            print(f"trial {index:3d} {kind:18s} {outcome:13s} {time.monotonic() - start:5.1f}s  {detail}", flush=True)
            shutil.rmtree(work, ignore_errors=True)
    print("\n| fault | trials | " + " | ".join(OUTCOMES) + " |\n|---|---:|" + "---:|" * len(OUTCOMES))
    for kind, counts in table.items():
        if counts:
            print(f"| {kind} | {sum(counts.values())} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
    totals = sum(table.values(), Counter())
    print(f"\nRESULT faults.trials={len(kinds)}")
    for outcome in OUTCOMES:
        print(f"RESULT faults.{'hangs' if outcome == 'hang' else outcome}={totals[outcome]}")


if __name__ == "__main__":
    main()

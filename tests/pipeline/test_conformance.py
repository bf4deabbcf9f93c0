"""Trainer-feature conformance: every supported flag gives the plain run's result (docs/pipeline_conformance.md).

One ``run_distributed`` launch of 4 ranks runs every cell of ``tests/helpers/conformance.py`` as a
pipeline, each rank building the cells' Trainers one after another; the test process runs the same
cells unpipelined. Each cell compares the final weights (every rank holds all of them after
training), the global step, every logged metric and, where the cell has them, checkpoints and
evaluation results. The launch also checks the global-norm functions against torch on the full model.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lightning_grendel.pipeline.clipping import clip_grad_norm_, global_grad_norm
from lightning_grendel.pipeline.examples.tiny_lm import lm_loss
from lightning_grendel.pipeline.ownership import counted_parameters
from lightning_grendel.pipeline.runtime import PipelineRuntime
from lightning_grendel.pipeline.stages import Pipeline
from lightning_grendel.resharding.mesh import Mesh
from tests.helpers.conformance import CELLS, LAYOUTS, WORLD, ConformanceData, make_model, resume, run_cell
from tests.helpers.distributed import run_distributed

RESUMES = ("resume-same", "resume-other-meshes", "resume-from-plain")
NORM_TYPES = (2.0, math.inf, 1.5)


def _clip_checks(rank: int) -> dict:
    """The global norm and clipping on the ``tp`` layout (column-parallel stage, data-parallel stage) vs torch."""
    layout = LAYOUTS["tp"]
    batch = next(iter(ConformanceData().train_dataloader()))
    reference = make_model("tp")
    lm_loss(reference(batch[0]), batch[1]).backward()
    full = [p.grad for p in reference.parameters()]
    model = make_model("tp")
    meshes = [Mesh(ranks, tuple(shape)) for ranks, shape in zip(layout["stage_meshes"], layout["mesh_shapes"],
                                                                strict=True)]
    pipeline = Pipeline(model.pipeline_stages().stages, lm_loss)
    runtime = PipelineRuntime(pipeline, meshes, num_microbatches=2)
    runtime.step(batch)
    runtime.close()
    params = list(model.parameters())
    counted = counted_parameters(params, [s.module for s in pipeline.stages], meshes, rank)
    norms = {p: (float(global_grad_norm(counted, p)), float(torch.nn.utils.get_total_norm(full, p)))
             for p in NORM_TYPES}
    mine = [i for i, p in enumerate(params) if p.grad is not None]
    total = clip_grad_norm_(params, counted, max_norm=0.1)
    torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=0.1)
    clipped = max(float((params[i].grad - full[i]).abs().max()) for i in mine)
    if rank == layout["stage_meshes"][1][0]:
        params[mine[0]].grad[0] = math.nan  # a gradient this rank counts is NaN: every rank must raise
    try:
        clip_grad_norm_(params, counted, max_norm=0.1, error_if_nonfinite=True)
        raised = False
    except RuntimeError:
        raised = True
    dist.barrier()
    return {"norms": norms, "total": float(total), "clipped_error": clipped, "counted": len(counted),
            "nonfinite_raised": raised}


def _pipelined(rank: int, world: int, folder: str, plain_checkpoint: str) -> dict:
    folder = Path(folder)
    results = {name: run_cell(name, True, folder / name) for name in CELLS}
    first = folder / "resume-first"
    resume(True, "tp", first, None, max_epochs=1)
    results["resume-same"] = resume(True, "tp", folder / "resume-same", first / "last.ckpt", 2)
    results["resume-other-meshes"] = resume(True, "other", folder / "resume-other", first / "last.ckpt", 2)
    results["resume-from-plain"] = resume(True, "tp", folder / "resume-from-plain", Path(plain_checkpoint), 2)
    results["clipping"] = _clip_checks(rank)
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, list[dict], Path]:
    folder = tmp_path_factory.mktemp("conformance")
    threads = torch.get_num_threads()  # Lightning's launcher raises it in processes that run a Trainer
    torch.set_num_threads(1)  # the ranks' kernels: the exact cells compare bit for bit
    try:
        plain = {name: run_cell(name, False, folder / "plain" / name) for name in CELLS}
        resume(False, "tp", folder / "plain" / "resume-first", None, max_epochs=1)
        plain["resume"] = resume(False, "tp", folder / "plain" / "resume-straight", None, max_epochs=2)
    finally:
        torch.set_num_threads(threads)
    pipelined = run_distributed(_pipelined, WORLD, str(folder / "pipelined"),
                                str(folder / "plain" / "resume-first" / "last.ckpt"), timeout_s=150)
    return plain, pipelined, folder


def _close(got: torch.Tensor, want: torch.Tensor, exact: bool, what: str) -> None:
    if exact:
        assert torch.equal(got, want), f"{what}: differs by {float((got.double() - want.double()).abs().max())}"
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=what)


def _assert_weights(got: dict, want: dict, exact: bool, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key, value in want.items():
        assert got[key].dtype == value.dtype, (what, key)
        _close(got[key], value, exact, f"{what}: {key}")


def _assert_logged(got: list | None, want: list | None, what: str) -> None:
    if want is None:
        assert got is None, what
        return
    assert [(step, sorted(m)) for step, m in got] == [(step, sorted(m)) for step, m in want], what
    for (step, metrics), (_, expected) in zip(got, want, strict=True):
        for key, value in expected.items():
            assert math.isclose(metrics[key], value, rel_tol=1e-5, abs_tol=1e-6), (what, step, key)


def _step_logs(logged: list | None) -> list | None:
    """The metrics the module's steps logged (a hook's ``hook/`` metrics are per rank)."""
    if logged is None:
        return None
    return [(step, {k: v for k, v in metrics.items() if not k.startswith("hook/")}) for step, metrics in logged]


def _assert_checkpoints(got: list, want: list, what: str) -> None:
    assert len(got) == len(want), what
    for mine, theirs in zip(got, want, strict=True):
        assert mine["best"] == theirs["best"] and mine["kept"].keys() == theirs["kept"].keys(), what
        for name, score in theirs["kept"].items():
            assert math.isclose(mine["kept"][name], score, rel_tol=1e-5), (what, name)
        _assert_weights(mine["best_weights"], theirs["best_weights"], False, f"{what}: best checkpoint")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(CELLS))
def test_cell_equals_the_plain_run(runs, name):
    plain, pipelined, _ = runs
    want = plain[name]
    exact = CELLS[name].layout == "exact"  # identical arithmetic: the same bits
    start = make_model(CELLS[name].layout).state_dict()
    assert any(not torch.equal(want["weights"][k], v.to(want["weights"][k].dtype)) for k, v in start.items())
    for rank, results in enumerate(pipelined):
        got, what = results[name], f"{name}, rank {rank}"
        assert got["global_step"] == want["global_step"], what
        _assert_weights(got["weights"], want["weights"], exact, what)
        if not CELLS[name].plain:  # a reference with other batches logs other losses
            _assert_logged(_step_logs(got["logged"]), _step_logs(want["logged"]), what)
        _assert_checkpoints(got["checkpoints"], want["checkpoints"], what)
        if CELLS[name].run == "evaluate":
            for stage in ("validate", "test"):
                assert got[stage][0].keys() == want[stage][0].keys(), what
                for key, value in want[stage][0].items():
                    assert math.isclose(got[stage][0][key], value, rel_tol=1e-5), (what, stage, key)
    if CELLS[name].run == "evaluate":  # predictions may come back on some ranks only, but on one at least
        returned = [results[name]["predict"] for results in pipelined if results[name]["predict"] is not None]
        assert returned, "no rank returned predictions"
        for predictions in returned:
            assert len(predictions) == len(want["predict"]) == 1
            _close(predictions[0], want["predict"][0], False, "predictions")


def test_sync_dist_in_a_hook_reduces_over_ranks_as_under_ddp(runs):
    """A hook's ``sync_dist`` is honoured (mean, sum, epoch mean over the 4 ranks); a step's values are the
    plain run's (compared in the cell), not counted once per rank; the loaders keep their sampler."""
    plain, pipelined, _ = runs

    def hook_values(logged: list) -> dict[str, set[float]]:
        values: dict[str, set[float]] = {}
        for _, metrics in logged:
            for key, value in metrics.items():
                if key.startswith("hook/"):
                    values.setdefault(key, set()).add(value)
        return values

    assert hook_values(plain["sync-dist"]["logged"]) == {"hook/rank_mean": {0.0}, "hook/rank_sum": {0.0},
                                                         "hook/rank_epoch": {0.0}}
    for rank, results in enumerate(pipelined):
        assert hook_values(results["sync-dist"]["logged"]) == {"hook/rank_mean": {1.5}, "hook/rank_sum": {6.0},
                                                               "hook/rank_epoch": {1.5}}, rank
    step_logged = {key for _, metrics in plain["sync-dist"]["logged"] for key in metrics}
    assert {"train/loss_sync", "train/loss_total", "val/loss"} <= step_logged
    # is_distributed did not bring Lightning's DistributedSampler in: the loader's own order, on every rank
    assert {results["sync-dist"]["sampler"] for results in pipelined} == {plain["sync-dist"]["sampler"]}


def test_the_cells_would_catch_the_old_defects(runs):
    """The flags change the plain result far beyond the tolerance, so a pipeline ignoring them would fail.

    (Before this matrix, bf16-mixed ran in float32 and clipping used each stage's own norm.)
    """
    plain = runs[0]

    def distance(a: str, b: str) -> float:
        wa, wb = plain[a]["weights"], plain[b]["weights"]
        return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)

    for name in ("64-true", "bf16-true", "16-true", "bf16-mixed"):  # and these cells compare bit for bit
        assert distance(name, "32-true") > 0, name
    # early-stopping stops after the same 8 steps of the same layout in float32
    assert distance("bf16-mixed-micro-batches", "early-stopping") > 1e-4
    assert distance("clip-norm-bf16-true", "bf16-true") > 1e-3
    for name in ("clip-norm", "clip-value"):
        assert distance(name, "deterministic") > 1e-3, name  # "deterministic" is the same layout unclipped
    assert plain["max-time"]["global_step"] < 12 and plain["early-stopping"]["global_step"] < 24


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", RESUMES)
def test_resume_continues_like_an_uninterrupted_plain_run(runs, name):
    plain, pipelined, _ = runs
    want = plain["resume"]
    for rank, results in enumerate(pipelined):
        assert results[name]["global_step"] == want["global_step"] == 8, (name, rank)
        _assert_weights(results[name]["weights"], want["weights"], False, f"{name}, rank {rank}")


@pytest.mark.timeout(900)
def test_a_plain_run_resumes_from_a_pipelined_checkpoint(runs):
    plain, _, folder = runs
    resumed = resume(False, "tp", folder / "plain" / "from-pipelined", folder / "pipelined" / "resume-first" /
                     "last.ckpt", max_epochs=2)
    _assert_weights(resumed["weights"], plain["resume"]["weights"], False, "plain from pipelined")


@pytest.mark.timeout(900)
def test_global_norm_and_clipping_equal_torch_on_the_whole_model(runs):
    """Each parameter counted once over stages, TP shards and DP ranks; a NaN on one rank raises on all."""
    checks = [results["clipping"] for results in runs[1]]
    assert sum(c["counted"] for c in checks) == len(list(make_model("tp").parameters()))
    for rank, check in enumerate(checks):
        for norm_type, (got, want) in check["norms"].items():
            assert math.isclose(got, want, rel_tol=1e-5), (rank, norm_type)
        assert check["total"] > 0.1 * 2  # the clip did scale the gradients
        assert check["clipped_error"] < 1e-6, rank
        assert check["nonfinite_raised"], rank

"""The conformance matrix (docs/grendel_conformance.md): every Trainer feature under GrendelStrategy on
W = 1, 2, 3 ranks equals the single-process run, on every rank, or is refused before the run starts.

One ``run_distributed`` launch per world size; each rank runs every case's short Trainer in a row
(tests/helpers/conformance_cases.py). The single-process reference runs the same cases once.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.helpers.conformance_cases import (
    demo_data,
    early_stop_case,
    grendel_ranks,
    run_cases,
    write_resume_checkpoint,
)
from tests.helpers.distributed import run_distributed

RTOL = 2e-4  # after a few Adam steps: W ranks add the same terms in another order


def _epoch_end_losses(steps: list[dict], steps_per_epoch: int) -> list[float]:
    return [row["train/loss"] for row in steps if row["step"] % steps_per_epoch == 0]


def _stopping_threshold(losses: list[float]) -> tuple[float, int]:
    """A threshold between the first epoch-end loss below all earlier ones and the best of those (and that epoch)."""
    for epoch in range(1, len(losses)):
        best = min(losses[:epoch])
        if losses[epoch] < best:
            return (losses[epoch] + best) / 2, epoch
    raise AssertionError(f"no epoch-end loss improves on the earlier ones: {losses}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    data = demo_data()
    resume_from = write_resume_checkpoint(folder, data)
    out = run_cases(None, 1, folder, data, None, resume_from)
    threshold, epoch = _stopping_threshold(_epoch_end_losses(out["limits"]["steps"], 2))
    out["early_stop"] = early_stop_case(None, 1, folder, data, threshold)
    assert out["early_stop"]["stopped_epoch"] == epoch  # the threshold stops the reference where it should
    return {"out": out, "threshold": threshold, "resume_from": resume_from}


def _close(actual: float, expected: float, what: str, rtol: float = RTOL) -> None:
    assert math.isclose(actual, expected, rel_tol=rtol, abs_tol=1e-7), f"{what}: {actual} != {expected}"


def _same_steps(rows: list[dict], expected: list[dict], what: str, rtol: float = RTOL) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in expected], what
    for row, want in zip(rows, expected, strict=True):
        assert row.keys() == want.keys(), (what, row.keys(), want.keys())
        for key, value in want.items():
            _close(row[key], value, f"{what} step {want['step']} {key}", rtol)


def _same_grads(per_rank: list[list[dict]], expected: list[dict], what: str) -> None:
    """The ranks' shard gradients, concatenated in rank order, equal the single-process gradient rows."""
    for step, want in enumerate(expected):
        for key, grad in want.items():
            joined = torch.cat([rank[step][key] for rank in per_rank])
            torch.testing.assert_close(joined, grad, rtol=1e-4, atol=1e-9, msg=f"{what} step {step} grad of {key}")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_trainer_features_equal_the_single_process_run(world, reference, tmp_path):
    ranks = run_distributed(grendel_ranks, world, str(tmp_path), reference["threshold"],
                            str(reference["resume_from"]), timeout_s=300)
    ref = reference["out"]
    for rank, out in enumerate(ranks):
        tag = f"W={world} rank {rank}"
        # 1. Metrics: scene-wide on every rank (loss and its parts, Gaussian count, PSNR, SSIM).
        main = out["main"]
        _same_steps(main["steps"], ref["main"]["steps"], f"{tag} main")
        assert ref["main"]["steps"][-1]["train/gaussians"] > 240, "the clone-only densification must clone"
        assert len(main["validations"]) == len(ref["main"]["validations"]) == 2  # val_check_interval=3, 6 steps
        for got, want in zip(main["validations"], ref["main"]["validations"], strict=True):
            assert got.keys() == want.keys()
            for key in want:
                _close(got[key], want[key], f"{tag} {key}")
        # ModelCheckpoint(monitor="train/loss", save_top_k=2): the same two steps kept, scores equal.
        assert main["best_k"].keys() == ref["main"]["best_k"].keys() and main["best"] == ref["main"]["best"], tag
        for name, score in ref["main"]["best_k"].items():
            _close(main["best_k"][name], score, f"{tag} checkpoint {name}")
        assert main["on_disk"] == ref["main"]["on_disk"], tag
        assert main["lrs"].keys() == ref["main"]["lrs"].keys()
        for name, values in ref["main"]["lrs"].items():
            assert len(main["lrs"][name]) == len(values) and all(
                math.isclose(a, b, rel_tol=1e-6) for a, b in zip(main["lrs"][name], values, strict=True)), name

        # 2. Regularisers (MCMC's, and the subclass's scale term in "main"): values equal W = 1.
        _same_steps(out["mcmc"]["steps"], ref["mcmc"]["steps"], f"{tag} mcmc")
        assert ref["mcmc"]["steps"][0]["train/regularization"] > 0

        for case in ("limits", "overfit", "resume"):
            _same_steps(out[case]["steps"], ref[case]["steps"], f"{tag} {case}")
        for case in ("limits", "fast_dev_run"):
            assert len(out[case]["validations"]) == len(ref[case]["validations"])
            for got, want in zip(out[case]["validations"], ref[case]["validations"], strict=True):
                for key in want:
                    _close(got[key], want[key], f"{tag} {case} {key}")
        _same_steps(out["fast_dev_run"]["steps"], ref["fast_dev_run"]["steps"], f"{tag} fast_dev_run")
        assert out["fast_dev_run"]["written"] == [], "fast_dev_run writes no logs, checkpoints or PLY"
        assert out["early_stop"]["stopped_epoch"] == ref["early_stop"]["stopped_epoch"], tag
        assert out["early_stop"]["global_step"] == ref["early_stop"]["global_step"], tag
        _same_steps(out["early_stop"]["steps"], ref["early_stop"]["steps"], f"{tag} early_stop")
        _same_steps(out["float64"]["steps"], ref["float64"]["steps"], f"{tag} float64", rtol=1e-9)
        assert out["float64"]["dtype"] == torch.float64
        for stage in ("validate", "test"):
            assert out[stage][0].keys() == ref[stage][0].keys()
            for key, value in ref[stage][0].items():
                _close(out[stage][0][key], value, f"{tag} {stage} {key}")
        for got, want in zip(out["predict"], ref["predict"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # max_time: every rank stops after the same step (rank 0's clock, broadcast).
        assert out["max_time"]["global_step"] == ranks[0]["max_time"]["global_step"] >= 1, tag
        assert out["max_time"]["global_step"] < 10**4

    # Gradients: each rank's shard rows equal the single-process rows (the regulariser's included).
    for case in ("main", "mcmc", "clip_norm", "clip_value", "resume"):
        _same_grads([out[case]["grads"] for out in ranks], ref[case]["grads"], f"W={world} {case}")
    clipped = torch.sqrt(sum(g.double().pow(2).sum() for g in ref["clip_norm"]["grads"][0].values()))
    assert math.isclose(float(clipped), 1e-3, rel_tol=1e-4), "the norm clip must be active"
    assert max(float(g.abs().max()) for g in ref["clip_value"]["grads"][0].values()) == pytest.approx(1e-5)
    # Resumed from a one-process checkpoint on W ranks: every Gaussian, in order, equals one process. A nearly
    # round Gaussian's rotation hardly changes the image, so some quaternion gradients are rounding noise that
    # Adam (g / sqrt(v)) turns into steps of up to lr_quats (1e-3) in either direction: 1e-4 for those.
    for key, value in ref["resume"]["gaussians"].items():
        got = ranks[0]["resume"]["gaussians"][key]
        torch.testing.assert_close(got, value, rtol=RTOL, atol=1e-4 if key == "quats" else 1e-6, msg=key)
    assert all(out["resume"]["gaussians"] is None for out in ranks[1:])
    # self.log(..., sync_dist=True) reduces over ranks: renderer/rows_sent is every rank's sum, on every rank.
    for step in range(len(ref["main"]["steps"])):
        sent = sum(out["main"]["exchange"][step][0].get("rows_sent", 0.0) for out in ranks)
        for out in ranks:
            assert out["main"]["exchange"][step][1].get("renderer/rows_sent") == sent
    assert (sent > 0) == (world > 1)
    # Ranks fed different cameras (a DataLoader shuffled differently per rank) fail together, with the reason.
    for out in ranks:
        assert ("the ranks got different cameras" in out["mismatch"]) == (world > 1), out["mismatch"]


def test_summary_names_every_output():
    from lightning_grendel.splatting.fit_summary import fit_summary

    text = fit_summary("M", 10367, 3, 12.34, 300, 600, 29.361, "logs/v0", "logs/v0/ckpt/last.ckpt", Path("p.ply"))
    assert text.splitlines()[0] == ("M fit done on 3 ranks in 12.3 s: 10,367 Gaussians after 300 steps (600 images), "
                                    "val/psnr 29.36 dB (last validation)")
    assert [line.split()[0] for line in text.splitlines()[1:]] == ["logs:", "checkpoint:", "point"]
    assert "not validated" in fit_summary("M", 1, 1, 1.0, 1, 1, None, None, None, None)

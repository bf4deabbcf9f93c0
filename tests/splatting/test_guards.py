"""Finite-value guards: the issue's cases (a NaN pose, lr_scales 1e3) stop the run with a clear error,
leave the last good checkpoint as it was, or with on_nonfinite='skip' finish with every Gaussian finite;
on two ranks the verdict is collective (both ranks raise, neither hangs)."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.gaussians import make_parameters
from lightning_grendel.splatting.guards import FiniteGuard, NonFiniteError, bad_rows
from lightning_grendel.splatting.module import GaussianSplattingModule
from tests.helpers.distributed import run_distributed
from tests.helpers.scenes import random_gaussians


def _data() -> GaussianSplattingDataModule:
    return GaussianSplattingDataModule(format="demo", image_width=24, batch_size=1, num_init_points=150)


def _fit(module: GaussianSplattingModule, tmp_path, steps: int, data=None, callbacks=(), checkpoint=False):
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=checkpoint,
                      enable_progress_bar=False, limit_val_batches=0, callbacks=list(callbacks),
                      default_root_dir=tmp_path, enable_model_summary=False)
    trainer.fit(module, data or _data())
    return trainer


def _module(**kwargs) -> GaussianSplattingModule:
    return GaussianSplattingModule(sh_degree=0, export_ply=False, backend="torch", **kwargs)


def test_bad_rows_counts_rows_with_any_non_finite_entry():
    tensor = torch.zeros(4, 2, 3)
    tensor[1, 0, 2] = float("nan")
    tensor[3, 1, 1] = float("-inf")
    assert bad_rows(tensor).tolist() == [False, True, False, True]
    assert bad_rows(torch.tensor([1.0, float("inf")])).tolist() == [False, True]


def test_bad_rows_when_the_sum_is_not_finite_but_every_value_is():
    """The one-sum shortcut only ever skips the scan on a finite sum: an overflowing sum of finite values is
    scanned (no false alarm), and infinities of both signs, whose sum is NaN, are both found."""
    huge = torch.full((3, 2), 3e38)
    assert torch.isinf(huge.sum()) and not bad_rows(huge).any()
    huge[2, 0], huge[0, 1] = math.inf, -math.inf
    assert bad_rows(huge).tolist() == [True, False, True]


def test_bad_rows_in_chunks_equals_one_pass(monkeypatch):
    """Checked a few rows at a time (what bounds its memory), the answer is the one-pass one, across chunk edges."""
    tensor = torch.randn(23, 4, 3)
    tensor[[0, 6, 7, 15, 22], [1, 0, 3, 2, 1], [2, 0, 1, 1, 0]] = torch.tensor([math.nan, math.inf, -math.inf,
                                                                                 math.nan, math.inf])
    expected = ~torch.isfinite(tensor).flatten(1).all(dim=1)
    monkeypatch.setattr("lightning_grendel.splatting.guards.ROW_CHUNK", 7)
    assert torch.equal(bad_rows(tensor), expected) and int(expected.sum()) == 5
    assert torch.equal(bad_rows(tensor[:, 0, 0]), ~torch.isfinite(tensor[:, 0, 0]))
    assert bad_rows(torch.zeros(0, 3)).shape == (0,)


@pytest.mark.timeout(60)
def test_a_nan_training_pose_is_refused_before_the_first_step(tmp_path):
    data = _data()
    data.setup()
    data.scene.train.cameras.world_to_camera[2, 0, 3] = float("nan")  # what a NaN in a camera file gave
    with pytest.raises(ValueError, match="scene extent is nan: a training camera"):
        _fit(_module(), tmp_path, 2, data)


@pytest.mark.timeout(60)
def test_a_far_too_large_learning_rate_stops_with_parameter_step_and_rows(tmp_path):
    # Step 1 sends log-scales to ~1e3 (exp overflows in the render), step 2's gradients are NaN.
    with pytest.raises(NonFiniteError, match=r"non-finite gradients \(.*scales\.grad: \d+ rows") as info:
        _fit(_module(lr_scales=1e3), tmp_path, 4)
    assert "at optimiser step 2 (1 images seen)" in str(info.value) and "lr_scales" in str(info.value)


@pytest.mark.timeout(60)
def test_a_nan_loss_still_names_the_loss(tmp_path):
    class _Poison(Callback):
        def on_train_start(self, trainer, pl_module):
            with torch.no_grad():
                pl_module.gaussians["sh0"][0, 0, 0] = float("nan")

    with pytest.raises(FloatingPointError, match="the loss is nan after 0 images"):
        _fit(_module(), tmp_path, 2, callbacks=[_Poison()])


class _PoisonAt(Callback):
    """Makes some Gaussians NaN before a given step, as a diverging row would be."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.gaussians["scales"][:5] = float("nan")


@pytest.mark.timeout(90)
def test_no_checkpoint_is_written_after_the_failure(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=-1)
    with pytest.raises(NonFiniteError, match=r"scales\.grad: 5 rows\) at optimiser step 3"):
        _fit(_module(), tmp_path, 6, callbacks=[checkpoints, _PoisonAt(2)], checkpoint=True)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt",
                                                                      "last.ckpt"]
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for k, v in last["state_dict"].items() if k.startswith("gaussians."))


@pytest.mark.timeout(90)
def test_skip_mode_resets_the_rows_and_finishes_finite(tmp_path, caplog):
    module = _module(lr_scales=1e3, on_nonfinite="skip")
    with caplog.at_level("WARNING", logger="lightning_grendel.splatting.guards"):
        _fit(module, tmp_path, 3)
    assert all(torch.isfinite(p).all() for p in module.gaussians.values())
    assert module.global_step == 3
    assert any("skipped optimiser step" in r.message and "reset" in r.message for r in caplog.records)


def test_skip_mode_gives_up_on_a_persistently_nan_loss():
    params = make_parameters(random_gaussians(4, sh_degree=0))
    guard = FiniteGuard("skip")
    loss = torch.tensor(float("nan"))
    for _ in range(10):
        assert guard.before_step(loss, params, None, 1, 0) is False
    with pytest.raises(NonFiniteError, match="10 steps skipped in a row, giving up"):
        guard.before_step(loss, params, None, 1, 0)


def test_skip_after_densification_drops_only_the_bad_rows():
    raw = random_gaussians(6, sh_degree=0)
    raw["means"][[1, 4], 0] = float("inf")
    params = make_parameters(raw)
    assert FiniteGuard("skip").after_densify(params, None, 3, 12) == 2
    torch.testing.assert_close(params["means"].detach(), raw["means"][[0, 2, 3, 5]])
    with pytest.raises(NonFiniteError, match=r"after densification \(means: 1 rows\)"):
        bad = make_parameters({**raw, "means": raw["means"][:2]})
        FiniteGuard("stop").after_densify(bad, None, 3, 12)


def _one_bad_rank(rank: int, world: int) -> str:
    params = make_parameters(random_gaussians(5, seed=rank, sh_degree=0))
    if rank == 1:
        with torch.no_grad():
            params["quats"][2] = math.nan
    try:
        FiniteGuard("stop").after_step(params, torch.optim.Adam(params.values()), 7, 70)
    except NonFiniteError as error:
        return str(error)
    return "no error"


@pytest.mark.timeout(120)
def test_every_rank_stops_when_one_rank_has_a_nan():
    messages = run_distributed(_one_bad_rank, 2, timeout_s=30)
    for message in messages:
        assert "quats: 1 rows" in message and "optimiser step 7" in message and "summed over 2 ranks" in message


def test_save_ply_refuses_non_finite_rows_and_leaves_the_old_file(tmp_path):
    from lightning_grendel.splatting.ply import load_ply, save_ply

    path = tmp_path / "point_cloud.ply"
    good = random_gaussians(5, sh_degree=1)
    save_ply(path, good)
    bad = {**good, "scales": good["scales"].clone(), "quats": good["quats"].clone()}
    bad["scales"][1, 2] = float("nan")
    bad["quats"][3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"point_cloud\.ply: 2 of 5 Gaussians have NaN or infinite values "
                                         r"\(scales: 1, quats: 1\); refusing"):
        save_ply(path, bad)
    torch.testing.assert_close(load_ply(path)["scales"], good["scales"], rtol=0, atol=0)


def test_load_ply_reports_non_finite_rows_naming_the_file(tmp_path):
    import numpy as np
    from plyfile import PlyData

    from lightning_grendel.splatting.ply import load_ply, save_ply

    path = tmp_path / "in.ply"
    save_ply(path, random_gaussians(4, sh_degree=0))
    ply = PlyData.read(str(path), mmap=False)
    ply["vertex"].data["opacity"][2] = np.nan  # what another tool may have written
    ply.write(str(path))
    with pytest.raises(ValueError, match=r"in\.ply: 1 of 4 Gaussians have NaN or infinite values \(opacities: 1\)"):
        load_ply(path)


@pytest.mark.timeout(180)
def test_under_grendel_every_rank_stops_on_a_far_too_large_learning_rate(tmp_path):
    from lightning_grendel.splatting.grendel import GrendelStrategy

    data = GaussianSplattingDataModule(format="demo", image_width=32, batch_size=1, num_init_points=150)
    trainer = Trainer(strategy=GrendelStrategy(start_method="spawn", timeout_s=30), accelerator="cpu", devices=2,
                      max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      limit_val_batches=0, default_root_dir=tmp_path, enable_model_summary=False)
    with pytest.raises(Exception, match=r"NonFiniteError: .*scales\.grad: \d+ rows\) .*summed over 2 ranks"):
        trainer.fit(_module(lr_scales=1e3), data)

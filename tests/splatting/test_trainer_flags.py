"""Trainer flags GaussianSplattingModule refuses: one ValueError naming the flag, before anything runs or is
written, on one process and under GrendelStrategy (before any rank is launched)."""

from __future__ import annotations

import re

import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

from lightning_grendel.splatting.densify import DensifyConfig
from lightning_grendel.splatting.grendel import GrendelStrategy
from lightning_grendel.splatting.module import GaussianSplattingModule
from tests.helpers.conformance_cases import demo_data

REFUSED = [
    ({"precision": "bf16-mixed"}, "Trainer(precision='bf16-mixed') is not supported"),
    ({"precision": "16-mixed"}, "Trainer(precision='bf16-mixed')"),  # Lightning makes it bf16-mixed on the CPU
    ({"precision": "bf16-true"}, "Trainer(precision='bf16-true') is not supported"),
    ({"precision": "16-true"}, "Trainer(precision='16-true') is not supported"),
    ({"gradient_clip_val": 1.0}, "gradient_clip_val=1.0, gradient_clip_algorithm='norm'"),
    ({"gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"}, "gradient_clip_algorithm='value'"),
    ({"accumulate_grad_batches": 2}, "Trainer(accumulate_grad_batches=2) is not supported"),
]


@pytest.fixture(scope="module")
def data():
    return demo_data()


def _module(**kwargs) -> GaussianSplattingModule:
    options = {"sh_degree": 0, "densify": DensifyConfig(start_images=10**6), "backend": "torch", **kwargs}
    return GaussianSplattingModule(**options)


def _refused(trainer: Trainer, module, data, needle: str, root, stage: str = "fit") -> None:
    try:
        with pytest.raises(ValueError, match=re.escape(needle)):
            getattr(trainer, stage)(module, data)
    finally:
        torch.use_deterministic_algorithms(False)  # Trainer(deterministic=True) sets it for the process
    assert list(root.iterdir()) == [], "a refused run writes nothing"


@pytest.mark.parametrize(("flags", "needle"), REFUSED)
def test_one_process_refuses_before_the_run(flags, needle, data, tmp_path):
    trainer = Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, max_steps=1, **flags)
    _refused(trainer, _module(), data, needle, tmp_path)


def test_precision_is_refused_for_evaluation_too(data, tmp_path):
    trainer = Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, precision="bf16-true")
    _refused(trainer, _module(), data, "precision='bf16-true'", tmp_path, stage="validate")


def test_gsplat_cannot_promise_determinism_or_float64(data, tmp_path):
    trainer = Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, deterministic=True)
    _refused(trainer, _module(backend="gsplat"), data, "Trainer(deterministic=True) cannot hold", tmp_path)
    trainer = Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, precision="64-true")
    _refused(trainer, _module(backend="gsplat"), data, "gsplat computes in float32 only", tmp_path)


def test_several_refused_flags_make_one_error(data, tmp_path):
    trainer = Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, precision="bf16-true",
                      accumulate_grad_batches=3)
    _refused(trainer, _module(), data, "precision='bf16-true') is not supported", tmp_path)
    with pytest.raises(ValueError, match=r"precision.*; Trainer\(accumulate_grad_batches=3\)"):
        trainer.fit(_module(), data)


def test_grendel_spawn_refuses_before_starting_a_rank(data, tmp_path):
    trainer = Trainer(strategy="grendel_spawn", accelerator="cpu", devices=2, default_root_dir=tmp_path,
                      accumulate_grad_batches=4)
    # A ValueError in this process, not a ProcessRaisedException from a started rank.
    _refused(trainer, _module(), data, "Trainer(accumulate_grad_batches=4) is not supported", tmp_path)
    assert isinstance(trainer.strategy.launcher, _MultiProcessingLauncher)  # what Lightning's predict loop tests


def test_grendel_refuses_before_its_process_group(data, tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")  # an outside launcher: this process starts no other rank
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("NODE_RANK", "0")
    strategy = GrendelStrategy(cluster_environment=LightningEnvironment(), timeout_s=5)
    trainer = Trainer(strategy=strategy, accelerator="cpu", devices=2, default_root_dir=tmp_path,
                      precision="bf16-mixed")
    _refused(trainer, _module(), data, "precision='bf16-mixed'", tmp_path)
    assert not torch.distributed.is_initialized()


def test_the_module_checks_its_own_clipping_arguments():
    with pytest.raises(ValueError, match="gradient_clip_algorithm must be 'norm' or 'value'"):
        _module(gradient_clip_algorithm="l2")
    with pytest.raises(ValueError, match="gradient_clip_val must be > 0"):
        _module(gradient_clip_val=0.0)

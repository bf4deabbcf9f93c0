"""GaussianSplattingDataModule: splits, batch shapes, rank-independent seeded order, format detection."""

from __future__ import annotations

import pytest
import torch

from lightning_grendel.splatting.cameras import Cameras
from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule


def check_batch(batch, batch_size: int, height: int, width: int) -> None:
    assert batch["image"].shape == (batch_size, height, width, 3) and batch["image"].dtype == torch.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["world_to_camera"].shape == (batch_size, 4, 4)
    assert batch["world_to_camera"].dtype == torch.float32
    assert batch["intrinsics"].shape == (batch_size, 3, 3) and batch["intrinsics"].dtype == torch.float32
    assert batch["index"].shape == (batch_size,) and batch["index"].dtype == torch.int64
    assert torch.equal(batch["world_to_camera"][:, 3], torch.tensor([0.0, 0, 0, 1]).expand(batch_size, 4))


def train_order(module: GaussianSplattingDataModule, epochs: int = 2) -> list[int]:
    loader = module.train_dataloader()
    return [int(i) for _ in range(epochs) for batch in loader for i in batch["index"]]


def test_blender_splits_and_batches(shared_dataset):
    root = shared_dataset("nerf_synthetic_blocks")
    module = GaussianSplattingDataModule(path=str(root), image_width=50, batch_size=4, num_init_points=500)
    module.setup("fit")
    assert module.resolved_format() == "blender"
    assert (len(module.scene.train), len(module.scene.val), len(module.scene.test)) == (60, 10, 20)
    check_batch(next(iter(module.train_dataloader())), 4, 50, 50)
    check_batch(next(iter(module.val_dataloader())), 1, 50, 50)
    check_batch(next(iter(module.test_dataloader())), 1, 50, 50)
    points, colors = module.initial_points()
    assert points.shape == (500, 3) and colors.shape == (500, 3)
    cameras = module.train_cameras()
    assert isinstance(cameras, Cameras) and len(cameras) == 60
    assert torch.equal(module.background, torch.ones(3))


def test_colmap_splits_hold_out_every_eighth_image(shared_dataset):
    root = shared_dataset("colmap_blocks")
    module = GaussianSplattingDataModule(path=str(root), image_width=60)
    module.setup("fit")
    assert module.resolved_format() == "colmap"
    scene = module.scene
    assert (len(scene.train), len(scene.test)) == (43, 7)
    assert scene.test.names == [f"{i:05d}.jpg" for i in range(0, 50, 8)]
    assert scene.val.names == scene.test.names
    assert not set(scene.train.names) & set(scene.test.names)
    check_batch(next(iter(module.train_dataloader())), 1, 45, 60)
    check_batch(next(iter(module.val_dataloader())), 1, 45, 60)
    points, colors = module.initial_points()
    assert points.shape == (13454, 3) and colors.shape == (13454, 3)


def test_demo_needs_no_path():
    module = GaussianSplattingDataModule(image_width=32, batch_size=2)
    assert module.resolved_format() == "demo"
    module.setup("fit")
    train, val, test = module.scene.train, module.scene.val, module.scene.test
    assert len(train) > len(val) > 0 and len(test) > 0
    check_batch(next(iter(module.train_dataloader())), 2, 32, 32)
    check_batch(next(iter(module.test_dataloader())), 1, 32, 32)
    assert len(module.train_cameras()) == len(train)
    points, colors = module.initial_points()
    assert points.shape == (5000, 3) and colors.shape == (5000, 3)


def test_train_order_is_seeded_and_identical_across_instances():
    """Every rank builds its own DataModule; all must see the same camera order, epoch after epoch."""
    a = GaussianSplattingDataModule(image_width=16, seed=5)
    b = GaussianSplattingDataModule(image_width=16, seed=5)
    c = GaussianSplattingDataModule(image_width=16, seed=6)
    order_a = train_order(a)
    n = len(a.scene.train)
    assert order_a == train_order(b)
    assert order_a != train_order(c)
    assert sorted(order_a[:n]) == list(range(n)) and order_a[:n] != order_a[n:], "reshuffled every epoch"
    assert order_a[:n] != list(range(n))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="needs a dataset folder: pass --data.path"):
        GaussianSplattingDataModule(format="colmap")
    with pytest.raises(ValueError, match="generated in code"):
        GaussianSplattingDataModule(path=str(tmp_path), format="demo")
    with pytest.raises(FileNotFoundError, match="cannot tell the dataset format"):
        GaussianSplattingDataModule(path=str(tmp_path)).setup("fit")
    with pytest.raises(ValueError, match="not both"):
        GaussianSplattingDataModule(image_width=16, downscale=2.0).setup("fit")


def test_arguments_parse_from_yaml():
    """The recipes configure the DataModule through jsonargparse (LightningCLI)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(GaussianSplattingDataModule, "data")
    config = parser.parse_string(
        "data:\n  path: /some/where\n  format: colmap\n  image_width: 240\n  background: [0, 0, 0]\n"
        "  test_every: 4\n  batch_size: 2\n  seed: 7\n"
    )
    module = parser.instantiate_classes(config).data
    assert module.path.as_posix() == "/some/where" and module.resolved_format() == "colmap"
    assert (module.image_width, module.test_every, module.batch_size, module.seed) == (240, 4, 2, 7)
    assert torch.equal(module.background, torch.zeros(3))
    with pytest.raises(Exception, match="format"):
        parser.parse_string("data:\n  format: nerf\n")

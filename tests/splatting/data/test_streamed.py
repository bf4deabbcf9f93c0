"""Streamed images: the same batches as the in-memory path, a bounded memory cache, prefetching, one decode
per host through the shared disk cache, and clear errors for files that break mid-run."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch

from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.data.image_cache import LOCK_FILE
from lightning_grendel.splatting.data.streamed import ImageStorage, StreamedImages
from tests.helpers.capture_files import HEIGHT, WIDTH, damage_cache_entry, write_colmap_capture
from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.timeout(180)
IMAGE_BYTES = WIDTH * HEIGHT * 3


def batches(loader, epochs: int = 2) -> list[dict]:
    return [batch for _ in range(epochs) for batch in loader]


def assert_same_batches(expected: list[dict], actual: list[dict]) -> None:
    assert len(expected) == len(actual)
    for one, other in zip(expected, actual, strict=True):
        assert one.keys() == other.keys()
        for key in one:
            assert torch.equal(one[key], other[key]), key


def loaders(module: GaussianSplattingDataModule) -> list:
    return [module.train_dataloader(), module.val_dataloader(), module.test_dataloader()]


@pytest.mark.parametrize("dataset,options", [
    ("colmap_blocks", {"image_width": 60}),
    ("nerf_synthetic_blocks", {"image_width": 40, "num_init_points": 100}),  # RGBA over the background
])
def test_streamed_batches_equal_the_in_memory_ones(shared_dataset, tmp_path, dataset, options):
    """Bit-identical batches in the same order, epoch after epoch: with the disk cache, and without it under
    a budget of four images (so the memory cache evicts and images are decoded again)."""
    path = str(shared_dataset(dataset))
    held = GaussianSplattingDataModule(path, batch_size=3, image_storage="memory", **options)
    assert isinstance(held.scene.train.images, torch.Tensor)
    expected = [batches(loader) for loader in loaders(held)]
    channels = held.scene.train.images.shape[-1]
    small = 4 * held.scene.train.images[0].numel()
    memory_only = {"image_disk_cache": False, "image_cache_bytes": small}
    for extra in ({"image_cache_dir": str(tmp_path / "cache")}, memory_only):
        streamed = GaussianSplattingDataModule(path, batch_size=3, image_storage="stream", **options, **extra)
        images = streamed.scene.train.images
        assert isinstance(images, StreamedImages) and images.shape[-1] == channels
        for loader, wanted in zip(loaders(streamed), expected, strict=True):
            assert_same_batches(wanted, batches(loader))
        assert images.held_bytes <= max(images.budget_bytes, images[0].numel())
    files = {name for split in (held.scene.train, held.scene.val, held.scene.test) for name in split.names}
    assert len(list((tmp_path / "cache").glob("*.npy"))) == len(files)  # one entry per image file


def test_auto_streams_only_beyond_the_budget(tmp_path):
    write_colmap_capture(tmp_path / "data", "PINHOLE", "40 40 24 18", count=4)
    data = str(tmp_path / "data")
    small = GaussianSplattingDataModule(data, test_every=2, image_cache_bytes=4 * IMAGE_BYTES)
    assert isinstance(small.scene.train.images, torch.Tensor)
    large = GaussianSplattingDataModule(data, test_every=2, image_cache_bytes=4 * IMAGE_BYTES - 1,
                                        image_cache_dir=str(tmp_path / "cache"))
    assert isinstance(large.scene.train.images, StreamedImages)
    with pytest.raises(ValueError, match="image_storage must be auto, memory or stream"):
        ImageStorage("disk")


def test_the_next_batch_is_prefetched_while_this_one_is_used(tmp_path):
    write_colmap_capture(tmp_path / "data", "PINHOLE", "40 40 24 18", count=8)
    module = GaussianSplattingDataModule(str(tmp_path / "data"), test_every=8, batch_size=2, image_storage="stream",
                                         image_disk_cache=False)
    images = module.scene.train.images
    order = [int(i) for batch in module.train_dataloader() for i in batch["index"]]
    loader = iter(module.train_dataloader())  # the same seeded order again
    first = next(loader)
    assert first["index"].tolist() == order[:2]
    deadline = time.monotonic() + 60
    while images._pending and time.monotonic() < deadline:  # the background thread decodes batch 2
        time.sleep(0.01)
    assert set(order[2:4]) <= set(images._ready), "the next batch was not prefetched"
    decoded = images.decoded
    assert next(loader)["index"].tolist() == order[2:4] and images.decoded == decoded  # nothing decoded now


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_that_breaks_mid_run_is_an_error_naming_it(tmp_path, workers):
    """A file that passes the set-up check (its header) but fails to decode stops the run with its name,
    from the prefetch thread or a DataLoader worker alike, instead of hanging."""
    paths = write_colmap_capture(tmp_path / "data", "PINHOLE", "40 40 24 18", count=6)
    module = GaussianSplattingDataModule(str(tmp_path / "data"), test_every=6, image_storage="stream",
                                         image_disk_cache=False, num_workers=workers)
    victim = next(path for path in paths if path.name in module.scene.train.names)
    victim.write_bytes(victim.read_bytes()[:200])  # header intact, pixel data cut
    with pytest.raises(OSError, match=f"{victim}: cannot decode image"):
        for _ in module.train_dataloader():
            pass


def test_an_unwritable_cache_folder_falls_back_to_memory_with_one_warning(tmp_path, caplog):
    write_colmap_capture(tmp_path / "data", "PINHOLE", "40 40 24 18", count=6)
    (tmp_path / "a_file").write_text("")
    data = str(tmp_path / "data")
    expected = batches(GaussianSplattingDataModule(data, test_every=3, image_storage="memory").train_dataloader())
    with caplog.at_level(logging.WARNING):
        module = GaussianSplattingDataModule(data, test_every=3, image_storage="stream",
                                             image_cache_dir=str(tmp_path / "a_file" / "cache"))
        assert_same_batches(expected, batches(module.train_dataloader()))
    assert caplog.text.count("not writable") == 1 and "held in memory" in caplog.text


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong shape"])
def test_a_corrupt_cache_entry_is_rebuilt(tmp_path, caplog, damage):
    write_colmap_capture(tmp_path / "data", "PINHOLE", "40 40 24 18", count=3)
    options = {"path": str(tmp_path / "data"), "test_every": 3, "image_storage": "stream",
               "image_cache_dir": str(tmp_path / "cache")}
    expected = batches(GaussianSplattingDataModule(**options).train_dataloader(), epochs=1)
    victim = sorted((tmp_path / "cache").glob("*.npy"))[0]
    damage_cache_entry(victim, damage)
    with caplog.at_level(logging.WARNING):
        assert_same_batches(expected, batches(GaussianSplattingDataModule(**options).train_dataloader(), epochs=1))
    assert str(victim) in caplog.text and "recomputing" in caplog.text
    assert np.load(victim).shape == (HEIGHT, WIDTH, 3)  # rewritten whole


def _rank_reads_capture(rank: int, world_size: int, data: str, cache: str) -> tuple[int, bool]:
    """One rank of a host: stream the capture through the shared cache; (images it decoded itself, whether
    its batches equal the in-memory ones)."""
    module = GaussianSplattingDataModule(data, test_every=10, batch_size=2, image_storage="stream",
                                         image_cache_dir=cache)
    images = module.scene.train.images
    made = []
    for index, source in enumerate(images.sources):
        def counted(decode=source.decode, index=index):
            made.append(index)
            return decode()
        images.sources[index] = type(source)(source.path, source.decoding, counted)
    torch.distributed.barrier()  # both ranks start decoding the same image at the same moment
    streamed = batches(module.train_dataloader(), epochs=1)
    held = batches(GaussianSplattingDataModule(data, test_every=10, batch_size=2, image_storage="memory",
                                               undistort_cache=False).train_dataloader(), epochs=1)
    same = all(torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])
               for a, b in zip(held, streamed, strict=True)) and len(held) == len(streamed)
    return len(made), same


def test_the_ranks_of_a_host_decode_each_image_once(tmp_path):
    """Two ranks reading the same images at once through one cache folder: each image is decoded by one of
    them (the other waits on its lock and maps the file), and both get the in-memory path's batches."""
    write_colmap_capture(tmp_path / "data", count=10)  # distorted: decoding means undistorting too
    results = run_distributed(_rank_reads_capture, 2, str(tmp_path / "data"), str(tmp_path / "cache"),
                              timeout_s=120)
    assert sum(made for made, _ in results) == 9 and all(same for _, same in results)
    assert sorted(path.name for path in (tmp_path / "cache").iterdir() if path.suffix != ".npy") == [LOCK_FILE]

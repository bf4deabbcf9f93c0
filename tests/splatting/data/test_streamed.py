"""Streamed images: the same batches as the in-memory path, a bounded memory cache, prefetching, one decode
per host through the shared disk cache, and clear errors for files that break mid-run."""

from __future__ import annotations

import gc
import logging
import threading
import time
import traceback

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.data.image_cache import LOCK_FILE
from lightning_grendel.splatting.data.rows import RowImages
from lightning_grendel.splatting.data.streamed import ImageStorage, StreamedImages
from tests.helpers.capture_files import HEIGHT, WIDTH, damage_cache_entry, write_colmap_capture
from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.timeout(180)
IMAGE_BYTES = WIDTH * HEIGHT * 3


def tensor(value) -> torch.Tensor:
    return value.full() if isinstance(value, RowImages) else value


def batches(loader, epochs: int = 2) -> list[dict]:
    """The batches, a streamed train batch's rows read now (as the step reads them)."""
    return [{key: tensor(value) for key, value in batch.items()} for _ in range(epochs) for batch in loader]


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
    images._ready.clear()  # what that pass prefetched
    load, loaded = images._load, []

    def spied(index):
        loaded.append((index, threading.current_thread().name.startswith("image-prefetch")))
        return load(index)

    images._load = spied
    loader = iter(module.train_dataloader())  # the same seeded order again
    first = next(loader)
    assert first["index"].tolist() == order[:2]
    first["image"].full()  # what the step reads: decoded now, on this thread
    deadline = time.monotonic() + 60
    while images._pending and time.monotonic() < deadline:  # the background thread decodes batch 2
        time.sleep(0.01)
    assert set(order[2:4]) <= set(images._ready), "the next batch was not prefetched"
    second = next(loader)
    assert second["index"].tolist() == order[2:4]
    second["image"].full()
    assert sorted((i, background) for i, background in loaded if i in order[:4]) == sorted(
        [(i, False) for i in order[:2]] + [(i, True) for i in order[2:4]])  # batch 2 came from the thread only


def prefetch_threads() -> list[threading.Thread]:
    """Live prefetch threads once garbage is collected (an earlier test's abandoned loader ends its thread when
    its iterator, often in a reference cycle, is collected)."""
    gc.collect()
    return [thread for thread in threading.enumerate() if thread.name.startswith("image-prefetch")]


def test_no_prefetch_thread_outlives_its_pass_or_a_fit(tmp_path):
    """The background thread ends when a pass is exhausted, when its loader is dropped mid-pass, and with the
    fit (stopped by max_steps mid-epoch); a later pass starts a new one and still gives the same batches."""
    from lightning_grendel.splatting.module import GaussianSplattingModule

    write_colmap_capture(tmp_path / "data", "PINHOLE", "40 40 24 18", count=8)
    module = GaussianSplattingDataModule(str(tmp_path / "data"), test_every=8, batch_size=2, image_storage="stream",
                                         image_disk_cache=False)
    assert not prefetch_threads()
    loader = iter(module.train_dataloader())
    first = next(loader)
    assert len(prefetch_threads()) == 1
    del loader
    gc.collect()
    assert not prefetch_threads()
    full = batches(module.train_dataloader(), epochs=1)
    assert not prefetch_threads() and torch.equal(full[0]["image"], first["image"].full())
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False,
                      default_root_dir=tmp_path)
    trainer.fit(GaussianSplattingModule(sh_degree=0, export_ply=False, backend="torch"), module)
    assert trainer.global_step == 2 and not prefetch_threads()


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
        for _ in module.train_dataloader():  # raised by the loader, before any row is read: on every rank alike
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


def test_cache_entries_are_read_without_parsing_python(tmp_path, monkeypatch):
    """np.load parses a .npy header with ast.literal_eval, which races another thread's parsing on CPython 3.11
    (``SystemError: AST constructor recursion depth mismatch``): entries are read without the ast module."""
    import ast

    write_colmap_capture(tmp_path / "data", "PINHOLE", "40 40 24 18", count=4)
    options = {"path": str(tmp_path / "data"), "test_every": 4, "image_storage": "stream",
               "image_cache_dir": str(tmp_path / "cache")}
    expected = batches(GaussianSplattingDataModule(**options).train_dataloader(), epochs=1)  # writes the entries

    parse, parsed = ast.parse, []

    def spied(*args, **kwargs):
        parsed.append("".join(traceback.format_stack(limit=8)))
        return parse(*args, **kwargs)

    module = GaussianSplattingDataModule(**options)
    module.setup()
    monkeypatch.setattr(ast, "parse", spied)
    streamed = batches(module.train_dataloader(), epochs=1)
    monkeypatch.undo()
    assert not parsed, parsed[0]
    assert_same_batches(expected, streamed)
    assert module.scene.train.images.decoded == 3 and len(list((tmp_path / "cache").glob("*.npy"))) == 3


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


def _rank_reads_its_rows(rank: int, world_size: int, data: str, cache: str) -> list[tuple[int, int, bool]]:
    """One Grendel rank renders the streamed batches: per batch, (rows it read, rows of the batch, whether what it
    read is exactly its views' rows and equals those rows of the in-memory batch, bit for bit)."""
    from lightning_grendel.splatting.data.datamodule import PosedImageDataset
    from lightning_grendel.splatting.gaussians import make_parameters
    from lightning_grendel.splatting.grendel.balancer import LoadBalancer
    from lightning_grendel.splatting.grendel.renderer import GrendelRenderer
    from lightning_grendel.splatting.losses import SSIM_HALO
    from lightning_grendel.splatting.module import cameras_from_batch
    from tests.helpers.scenes import random_gaussians

    reads: list[tuple[int, int, int]] = []
    pixels = PosedImageDataset.pixels

    def spied(self, index, rows=slice(None)):
        reads.append((index, rows.start, rows.stop))
        return pixels(self, index, rows)

    PosedImageDataset.pixels = spied
    options = {"test_every": 10, "batch_size": 2, "image_width": 96}
    streamed = GaussianSplattingDataModule(data, image_storage="stream", image_cache_dir=cache, **options)
    held = GaussianSplattingDataModule(data, image_storage="memory", undistort_cache=False, **options)
    renderer = GrendelRenderer(LoadBalancer("off"))
    raw = random_gaussians(40, seed=rank, sh_degree=0)
    params = make_parameters({key: value * 0.1 if key == "means" else value for key, value in raw.items()})
    results = []
    for lazy, full in zip(streamed.train_dataloader(), held.train_dataloader(), strict=True):
        reads.clear()
        views = renderer(params, cameras_from_batch(lazy), 0, torch.zeros(3), halo=SSIM_HALO).views
        rows = [(int(lazy["index"][v.view]), v.row_start, v.row_end) for v in views]
        same = all(torch.equal(lazy["image"][v.view, v.row_start : v.row_end],
                               full["image"][v.view, v.row_start : v.row_end]) for v in views)
        read = sum(stop - start for _, start, stop in reads)
        results.append((read, full["image"].shape[0] * full["image"].shape[1], same and reads == rows))
    return results


def test_a_grendel_rank_reads_only_the_rows_it_renders(tmp_path):
    """Two ranks render the streamed batches with the Grendel renderer: each converts only its views' rows
    (own rows plus the SSIM halo; fewer than the batch's), and they equal the in-memory batch's rows."""
    write_colmap_capture(tmp_path / "data", "PINHOLE", "40 40 24 18", count=10)
    per_rank = run_distributed(_rank_reads_its_rows, 2, str(tmp_path / "data"), str(tmp_path / "cache"),
                               timeout_s=120)
    assert all(exact for rank in per_rank for _, _, exact in rank), "a rank read other rows, or other values"
    assert all(read < total for rank in per_rank for read, total, _ in rank)
    assert all(len(rank) == 5 for rank in per_rank)

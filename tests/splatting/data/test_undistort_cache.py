"""The on-disk undistortion cache: a second load reads it, a changed image or camera does not, bad files heal."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from lightning_grendel.splatting.data.colmap import load_colmap_scene
from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.data.image_cache import LOCK_FILE, DecodedImageCache, default_cache_dir
from lightning_grendel.splatting.data.undistort import Undistortion
from tests.helpers.capture_files import HEIGHT, WIDTH, damage_cache_entry, noise_image, write_colmap_capture

pytestmark = pytest.mark.timeout(60)


def write_distorted_dataset(root, model: str = "SIMPLE_RADIAL", params: str = "40 24.3 17.8 -0.2") -> None:
    """Three noise images seen by one distorted camera (poses do not matter to the cache)."""
    write_colmap_capture(root, model, params)


@pytest.fixture
def remaps(monkeypatch) -> list[int]:
    """Counts undistortion remaps (one per image actually undistorted)."""
    calls: list[int] = []
    original = Undistortion.apply

    def counting(self: Undistortion, image: np.ndarray) -> np.ndarray:
        calls.append(1)
        return original(self, image)

    monkeypatch.setattr(Undistortion, "apply", counting)
    return calls


def all_images(scene) -> np.ndarray:
    return np.concatenate([scene.train.images.numpy(), scene.test.images.numpy()])


def cache_files(folder) -> list:
    """Every file but the lock file the cache keeps beside its entries."""
    return sorted(path for path in folder.iterdir() if path.name != LOCK_FILE)


def test_second_load_reads_the_cache_and_equals_undistorting(tmp_path, remaps):
    write_distorted_dataset(tmp_path / "data")
    cache = DecodedImageCache(tmp_path / "cache")
    first = load_colmap_scene(tmp_path / "data", test_every=2, cache=cache)
    assert len(remaps) == 3
    files = cache_files(tmp_path / "cache")
    assert len(files) == 3 and all(f.suffix == ".npy" for f in files)  # no temporary file left behind
    second = load_colmap_scene(tmp_path / "data", test_every=2, cache=DecodedImageCache(tmp_path / "cache"))
    assert len(remaps) == 3  # nothing undistorted again
    uncached = load_colmap_scene(tmp_path / "data", test_every=2)
    assert len(remaps) == 6
    np.testing.assert_array_equal(all_images(second), all_images(first))
    np.testing.assert_array_equal(all_images(second), all_images(uncached))
    # A resized load is another entry (output size is part of the key), not the full-size pixels.
    half = load_colmap_scene(tmp_path / "data", test_every=2, image_width=first.test.cameras.width // 2, cache=cache)
    assert len(remaps) == 9 and len(cache_files(tmp_path / "cache")) == 6
    assert half.test.images.shape[2] == first.test.cameras.width // 2


def test_a_changed_image_or_camera_is_undistorted_anew(tmp_path, remaps):
    data = tmp_path / "data"
    write_distorted_dataset(data)
    cache = DecodedImageCache(tmp_path / "cache")
    before = load_colmap_scene(data, test_every=2, cache=cache)
    noise_image(10).save(data / "images" / "im1.png")  # same name, new pixels
    stat = os.stat(data / "images" / "im1.png")
    os.utime(data / "images" / "im1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # coarse clocks
    after = load_colmap_scene(data, test_every=2, cache=cache)
    assert len(remaps) == 4  # only the changed image
    np.testing.assert_array_equal(all_images(after), all_images(load_colmap_scene(data, test_every=2)))
    assert not np.array_equal(all_images(after), all_images(before))
    remaps.clear()
    (data / "sparse" / "0" / "cameras.txt").write_text(f"1 SIMPLE_RADIAL {WIDTH} {HEIGHT} 40 24.3 17.8 -0.15\n")
    changed = load_colmap_scene(data, test_every=2, cache=cache)
    assert len(remaps) == 3  # every image of the changed camera
    np.testing.assert_array_equal(all_images(changed), all_images(load_colmap_scene(data, test_every=2)))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong shape"])
def test_a_corrupt_cache_file_is_recomputed_with_a_warning(tmp_path, remaps, caplog, damage):
    write_distorted_dataset(tmp_path / "data")
    cache = DecodedImageCache(tmp_path / "cache")
    expected = all_images(load_colmap_scene(tmp_path / "data", test_every=2, cache=cache))
    victim = cache_files(tmp_path / "cache")[0]
    damage_cache_entry(victim, damage)
    remaps.clear()
    with caplog.at_level(logging.WARNING):
        again = all_images(load_colmap_scene(tmp_path / "data", test_every=2, cache=cache))
    np.testing.assert_array_equal(again, expected)
    assert len(remaps) == 1 and str(victim) in caplog.text and "recomputing" in caplog.text
    assert np.load(victim).dtype == np.uint8  # rewritten whole


def test_an_unwritable_cache_folder_warns_once_and_loads(tmp_path, remaps, caplog):
    write_distorted_dataset(tmp_path / "data")
    (tmp_path / "a_file").write_text("")
    with caplog.at_level(logging.WARNING):
        scene = load_colmap_scene(tmp_path / "data", test_every=2, cache=DecodedImageCache(tmp_path / "a_file" / "c"))
    np.testing.assert_array_equal(all_images(scene), all_images(load_colmap_scene(tmp_path / "data", test_every=2)))
    assert caplog.text.count("not writable") == 1 and str(tmp_path / "a_file" / "c") in caplog.text


def test_pinhole_images_are_not_cached(tmp_path):
    write_distorted_dataset(tmp_path / "data", "PINHOLE", "40 40 24 18")
    load_colmap_scene(tmp_path / "data", test_every=2, cache=DecodedImageCache(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


def test_the_datamodule_chooses_the_folder_or_no_cache(tmp_path, monkeypatch, remaps):
    write_distorted_dataset(tmp_path / "data")
    data = str(tmp_path / "data")
    GaussianSplattingDataModule(data, test_every=2, undistort_cache_dir=str(tmp_path / "mine")).setup()
    assert len(cache_files(tmp_path / "mine")) == 3
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lightning-grendel" / "undistorted"
    GaussianSplattingDataModule(data, test_every=2).setup()
    assert len(cache_files(default_cache_dir())) == 3
    remaps.clear()
    GaussianSplattingDataModule(data, test_every=2, undistort_cache=False).setup()
    assert len(remaps) == 3

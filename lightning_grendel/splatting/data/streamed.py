"""Images decoded on demand instead of held: a bounded memory cache, a host-shared disk cache, prefetching.

Why: decoded as uint8, a capture of thousands of 1-4K photos does not fit in memory (Rubble's 1,657
images at 4608x3456 are 79 GB), and under GrendelStrategy every rank of a host would hold its own copy.
A streamed split keeps only the image files' names; an image is decoded when the dataset asks for it,
by the same function the in-memory path calls (so the bytes are identical), and kept in an LRU cache of
at most ``budget_bytes``. With a disk cache (:class:`~.image_cache.DecodedImageCache`), each image is
decoded once per host, written atomically, and read back memory-mapped: the ranks of a host then share
its pages in the page cache, one copy among them. :class:`PrefetchingSampler` asks for the next batch's
images while the current step runs, on a background thread (decoders release the GIL), so in steady
state the step does not wait on decoding; the thread lives as long as one pass over the loader. A
decoder's error (a truncated file) reaches the step as the decoder raised it, naming the file.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from lightning_grendel.splatting.data.image_cache import DecodedImageCache

StorageMode = Literal["auto", "memory", "stream"]


@dataclass(frozen=True)
class ImageSource:
    """One image file and how to decode it: ``decoding`` describes the transform (mode, undistortion) for
    the disk cache's key; ``decode`` gives uint8 [H, W, C]."""

    path: Path
    decoding: str
    decode: Callable[[], np.ndarray]


class StreamedImages:
    """A split's uint8 images [N, H, W, C], decoded when indexed; ``images[i]`` is a uint8 tensor [H, W, C].

    It answers what the dataset asks of the in-memory tensor (``shape``, ``dtype``, ``len``, ``[i]``).
    """

    dtype = torch.uint8

    def __init__(
        self, sources: Sequence[ImageSource], shape: tuple[int, int, int], budget_bytes: int,
        cache: DecodedImageCache | None = None,
    ) -> None:
        self.sources = list(sources)
        self.shape = (len(self.sources), *shape)
        self.budget_bytes = budget_bytes
        self.cache = cache
        self.decoded = 0  # images decoded or read from the disk cache by this process (tests, benchmarks)
        self._reset()

    def _reset(self) -> None:
        """Fresh per-process state (also in a forked DataLoader worker, whose parent's thread is gone)."""
        self._pid = os.getpid()
        self._mutex = threading.Lock()
        self._ready: OrderedDict[int, np.ndarray] = OrderedDict()
        self._held = 0
        self._pending: dict[int, Future] = {}
        self._executor: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict:  # DataLoader workers started with spawn get the sources, not the cache
        state = dict(self.__dict__)
        for key in ("_mutex", "_ready", "_pending", "_executor"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def held_bytes(self) -> int:
        """Bytes of decoded images this process holds in its memory cache (mapped entries included)."""
        return self._held

    def __getitem__(self, index: int) -> Tensor:
        if self._pid != os.getpid():
            self._reset()
        index = int(index)
        with self._mutex:
            if index in self._ready:
                self._ready.move_to_end(index)
                return torch.from_numpy(self._ready[index])
            future = self._pending.get(index)
        if future is None:
            pixels = self._load(index)
            with self._mutex:
                self._keep(index, pixels)
        else:
            try:
                pixels = future.result()  # a decoding error is raised here, in the step that needs the image
            finally:
                with self._mutex:
                    self._pending.pop(index, None)
        return torch.from_numpy(pixels)

    def prefetch(self, indices: Sequence[int]) -> None:
        """Start decoding ``indices`` on the background thread (those not already held or on their way)."""
        if self._pid != os.getpid():
            self._reset()
        with self._mutex:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="image-prefetch")
            for index in map(int, indices):
                if index not in self._ready and index not in self._pending:
                    self._pending[index] = self._executor.submit(self._prefetched, index)

    def stop_prefetching(self) -> None:
        """Cancel the decodes not started, wait for the running one and end the background thread.

        Called when a loader's pass is over (exhausted, abandoned or garbage-collected) and at the trainer's
        teardown, so no prefetch thread outlives the loop that used it (a live one racing the interpreter,
        e.g. pytest compiling the next module, is what the flaky ``AST constructor recursion depth`` errors
        were). The next :meth:`prefetch` starts a new thread.
        """
        if self._pid != os.getpid():
            self._reset()
            return
        with self._mutex:
            executor, self._executor = self._executor, None
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def _prefetched(self, index: int) -> np.ndarray:
        pixels = self._load(index)
        with self._mutex:
            self._keep(index, pixels)
            self._pending.pop(index, None)
        return pixels

    def _load(self, index: int) -> np.ndarray:
        source = self.sources[index]
        height, width, channels = self.shape[1:]
        if self.cache is None:
            pixels = source.decode()
        else:
            pixels = self.cache.image(source.path, source.decoding, (width, height), source.decode, channels, mmap=True)
        if pixels.shape != self.shape[1:] or pixels.dtype != np.uint8:
            raise ValueError(f"{source.path}: decoded to {pixels.dtype} {pixels.shape}, not uint8 {self.shape[1:]}")
        self.decoded += 1
        return pixels

    def _keep(self, index: int, pixels: np.ndarray) -> None:
        """Hold ``pixels`` (under the mutex), dropping the least recently used images beyond the budget."""
        if index in self._ready:
            return
        self._ready[index] = pixels
        self._held += pixels.nbytes
        while self._held > self.budget_bytes and len(self._ready) > 1:
            _, dropped = self._ready.popitem(last=False)
            self._held -= dropped.nbytes


class PrefetchingSampler(Sampler[int]):
    """``sampler``'s indices, in its order; at the first index of each batch it asks ``images`` to prefetch
    the next batch's, so they decode while the step on this batch runs."""

    def __init__(self, sampler: Sampler[int], images: StreamedImages, batch_size: int) -> None:
        self.sampler = sampler
        self.images = images
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[int]:
        # The inner sampler is asked exactly as far as the consumer asks, plus the next batch but never past its
        # length: RandomSampler draws another permutation from the loader's shared generator when asked past its
        # end, so asking further than a plain loader would change every later epoch's order.
        indices, remaining = iter(self.sampler), len(self.sampler)

        def draw() -> list[int]:
            nonlocal remaining
            batch = list(itertools.islice(indices, min(self.batch_size, remaining)))
            remaining -= len(batch)
            return batch

        current, upcoming = draw(), draw()
        try:
            while current:
                self.images.prefetch(upcoming)
                yield from current
                current, upcoming = upcoming, draw()
            yield from indices  # asked past the end: whatever the sampler itself does there
        finally:  # exhausted, or closed when the loader's iterator is dropped: the thread ends with the pass
            self.images.stop_prefetching()

    def __len__(self) -> int:
        return len(self.sampler)


@dataclass(frozen=True)
class ImageStorage:
    """How a loader holds decoded images: all in memory, or streamed (see the module docstring).

    Args:
        mode: ``memory`` decodes every image up front; ``stream`` on demand; ``auto`` streams when the
            scene's decoded images would take more than ``budget_bytes``.
        budget_bytes: most bytes of decoded images a streamed split keeps in memory (per process).
        cache: the disk cache of streamed images (None: decode every time an image is not in memory).
    """

    mode: StorageMode = "memory"
    budget_bytes: int = 1 << 30
    cache: DecodedImageCache | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "memory", "stream"):
            raise ValueError(f"image_storage must be auto, memory or stream, got {self.mode!r}")
        if self.budget_bytes < 0:
            raise ValueError(f"image_cache_bytes must be >= 0, got {self.budget_bytes}")

    def streams(self, total_bytes: int) -> bool:
        """Whether a scene whose decoded images take ``total_bytes`` is streamed."""
        return self.mode == "stream" or (self.mode == "auto" and total_bytes > self.budget_bytes)

    def split_images(self, sources: Sequence[ImageSource], shape: tuple[int, int, int],
                     stream: bool) -> Tensor | StreamedImages:
        """The images of one split: every one decoded now (a tensor [N, H, W, C]), or streamed."""
        if stream:
            return StreamedImages(sources, shape, self.budget_bytes, self.cache)
        return torch.from_numpy(np.stack([source.decode() for source in sources]))

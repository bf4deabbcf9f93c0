"""A training batch's target images, read row range by row range: what a streamed split's train loader yields.

Why: under GrendelStrategy a rank renders, and so compares against, only the tile rows of its partition
(plus the SSIM halo), and the partition is decided in the step, after loading. Streamed images are
memory-mapped from the host's disk cache, so handing the step rows on demand instead of whole float32
images means a rank faults in and converts only the rows it uses (about 1/W of each image) instead of
H·W·C uint8 pages and an H·W·3 float32 copy per image. The conversion (uint8 to float32, alpha over the
background) is elementwise and is the dataset's own function, so the rows are bit-identical to the same rows
of the whole-image batch. The images themselves are still decoded (or mapped) in the loader, for every view
on every rank, so a file that fails to decode stops every rank at the same batch.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import default_collate


class RowSource(Protocol):
    """What :class:`RowImages` reads from: the dataset's images and their conversion."""

    def pixels(self, index: int, rows: slice = ...) -> Tensor:
        """Rows of image ``index`` as float32 [rows, W, 3] in [0, 1]."""

    def image_shape(self) -> tuple[int, int]:
        """(H, W) of every image."""

    def load(self, index: int) -> None:
        """Have image ``index`` decoded (or mapped from the disk cache, no page read), raising its error."""


class RowImages:
    """Float32 images [B, H, W, 3] of a batch, converted when indexed: ``images[v, a:b]`` reads rows a..b of
    view v only; ``images[v]`` gives a whole image, :meth:`full` the stacked tensor.

    Deliberately not an ``Iterable``: Lightning walks a batch's iterables to infer its size, which would read
    every row.
    """

    dtype = torch.float32

    def __init__(self, source: RowSource, indices: list[int], device: torch.device | None = None) -> None:
        self.source = source
        self.indices = indices
        self.device = device
        self.shape = torch.Size((len(indices), *source.image_shape(), 3))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, slice]) -> Tensor:
        view, rows = key if isinstance(key, tuple) else (key, slice(None))
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"RowImages: index as images[view] or images[view, start:end], got {key!r}")
        pixels = self.source.pixels(self.indices[int(view)], rows)
        return pixels if self.device is None else pixels.to(self.device)

    def full(self) -> Tensor:
        """Every image, stacked [B, H, W, 3] (reads every row)."""
        return torch.stack([self[view] for view in range(len(self))])

    def new_zeros(self, *size: Any) -> Tensor:
        return torch.zeros(*size, dtype=self.dtype, device=self.device)

    def to(self, device: torch.device | str, *args: Any, **kwargs: Any) -> RowImages:
        """Lightning moves batches with ``.to``: the rows go to ``device`` when they are read."""
        return RowImages(self.source, self.indices, torch.device(device))


class CollateRows:
    """``default_collate`` of the items (cameras, indices), with ``image`` a :class:`RowImages` of ``source``."""

    def __init__(self, source: RowSource) -> None:
        self.source = source

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = default_collate(items)
        for index in batch["index"]:  # every rank, every view: a file that fails to decode fails here, everywhere
            self.source.load(int(index))
        # First: Lightning's batch-size inference passes over a leading non-tensor, but warns about one after a tensor.
        return {"image": RowImages(self.source, [int(i) for i in batch["index"]]), **batch}

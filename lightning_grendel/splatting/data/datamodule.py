"""LightningDataModule serving posed images for Gaussian splatting from COLMAP, nerfstudio, Blender or the
demo scene.

Distributed 3DGS (Grendel) renders the same cameras on every rank, so the train loader must yield the
same order everywhere: it is a plain shuffled DataLoader driven by a generator seeded identically on
every rank, never a DistributedSampler that would hand each rank different views.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from lightning_grendel.splatting.cameras import Cameras
from lightning_grendel.splatting.data.blender import load_blender_scene
from lightning_grendel.splatting.data.colmap import find_model_dir, load_colmap_scene
from lightning_grendel.splatting.data.demo_scene import make_demo_scene
from lightning_grendel.splatting.data.image_cache import DecodedImageCache
from lightning_grendel.splatting.data.nerfstudio import TRANSFORMS_FILE, load_nerfstudio_scene
from lightning_grendel.splatting.data.rows import CollateRows
from lightning_grendel.splatting.data.scene import ImageSplit, SceneData
from lightning_grendel.splatting.data.streamed import ImageStorage, PrefetchingSampler, StorageMode, StreamedImages

Format = Literal["auto", "blender", "colmap", "nerfstudio", "demo"]
DatasetFormat = Literal["blender", "colmap", "nerfstudio"]
BLENDER_INIT_POINTS = 100_000  # as in 3DGS for NeRF-synthetic
DEMO_INIT_POINTS = 5_000  # enough for the small demo scene, cheap on two CPU cores


class PosedImageDataset(Dataset):
    """Items ``{"image" [H,W,3] float32 in [0,1], "world_to_camera" [4,4], "intrinsics" [3,3], "index"}``.

    Images with alpha are composited over ``background`` per item (``rgb*a + bg*(1-a)``). With
    ``rows_on_demand`` the items have no ``image``: :class:`~.rows.CollateRows` gives the batch a
    :class:`~.rows.RowImages` that reads rows through :meth:`pixels` when the step asks for them.
    """

    def __init__(self, split: ImageSplit, background: Tensor, rows_on_demand: bool = False) -> None:
        self.split = split
        self.background = background.to(torch.float32)
        self.rows_on_demand = rows_on_demand

    def __len__(self) -> int:
        return len(self.split)

    def image_shape(self) -> tuple[int, int]:
        return tuple(self.split.images.shape[1:3])

    def load(self, index: int) -> None:
        """Decode image ``index`` now (streamed: held or memory-mapped, rows not read yet)."""
        self.split.images[index]

    def pixels(self, index: int, rows: slice = slice(None)) -> Tensor:
        """Rows of image ``index`` as float32 [rows, W, 3] in [0, 1] (elementwise, so any rows equal the same
        rows of the whole image)."""
        pixels = self.split.images[index][rows].to(torch.float32) / 255.0
        if pixels.shape[-1] == 4:
            alpha = pixels[..., 3:]
            pixels = pixels[..., :3] * alpha + self.background * (1.0 - alpha)
        return pixels

    def __getitem__(self, index: int) -> dict[str, Tensor | int]:
        item = {} if self.rows_on_demand else {"image": self.pixels(index)}
        return {
            **item,
            "world_to_camera": self.split.cameras.world_to_camera[index],
            "intrinsics": self.split.cameras.intrinsics[index],
            "index": index,
        }


def detect_format(path: Path) -> DatasetFormat:
    """``blender`` when ``transforms_train.json`` is there, ``nerfstudio`` when ``transforms.json`` is, ``colmap``
    when a sparse model is."""
    if (path / "transforms_train.json").is_file():
        return "blender"
    if (path / TRANSFORMS_FILE).is_file():
        return "nerfstudio"
    try:
        find_model_dir(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{path}: cannot tell the dataset format: no transforms_train.json (Blender), no transforms.json "
            "(nerfstudio) and no cameras.bin/cameras.txt in sparse/0, sparse or the folder itself (COLMAP)"
        ) from error
    return "colmap"


class GaussianSplattingDataModule(LightningDataModule):
    """Train/val/test posed images plus the initial points and train cameras the Gaussian model needs.

    Args:
        path: dataset folder (Blender: holds ``transforms_train.json``; nerfstudio, Polycam, Record3D: holds
            ``transforms.json``; COLMAP: holds ``images/`` and ``sparse/0``). Not used for ``format="demo"``.
        format: ``auto`` detects Blender, nerfstudio or COLMAP from the files under ``path`` (demo when no
            path).
        image_width: resize images to this width (aspect kept); intrinsics follow.
        downscale: or divide the size by this factor (give one of image_width / downscale). COLMAP and
            nerfstudio: an integer d reads the ``images_<d>`` folder beside the images when there is one
            (Mip-NeRF 360, ``ns-process-data``) instead of resizing on the fly.
        background: colour transparent Blender pixels are composited over, also the render background.
        test_every: COLMAP and nerfstudio hold-out: every ``test_every``-th image (sorted by name) is a
            test view; val is the same set (nerfstudio's ``test_filenames``, when given, win).
        num_init_points: initial points for Blender (uniformly random in [-1.3, 1.3]^3, default 100 000),
            nerfstudio without ``ply_file_path`` (random in the cube around the cameras, default 100 000)
            and the demo scene (on seen surfaces, default 5 000); COLMAP uses its 3D points.
        batch_size: cameras per training step.
        num_workers: DataLoader worker processes.
        seed: seeds the train order (identical on every rank) and random initial points.
        undistort_cache: keep COLMAP and nerfstudio images of distorted cameras (OPENCV, ...) undistorted
            on disk, so the next run (``fit``, ``test``, ``render``) reads them instead of remapping
            again; entries are keyed by the image file (path, mtime, size), the camera and the output
            size, so a changed image or camera is undistorted anew.
        undistort_cache_dir: where those files go (default ``$XDG_CACHE_HOME/lightning-grendel/undistorted``,
            i.e. ``~/.cache/lightning-grendel/undistorted``); delete the folder to reclaim the space.
        image_storage: ``memory`` decodes every image at setup and holds it; ``stream`` decodes images when a
            batch needs them, keeps at most ``image_cache_bytes`` of them and prefetches the next batch on a
            background thread (for captures larger than memory; batches are identical); ``auto`` streams
            when the decoded images would take more than ``image_cache_bytes``.
        image_cache_bytes: most bytes of decoded images a streamed scene keeps in memory, per process.
        image_disk_cache: streamed images are also written once, decoded, to ``image_cache_dir`` and read
            back memory-mapped, so every rank of a host shares one copy (an unwritable folder falls back to
            memory with one warning).
        image_cache_dir: the streamed images' folder (default ``$XDG_CACHE_HOME/lightning-grendel/images``);
            it takes H·W·C bytes per image, so delete it to reclaim the space.
    """

    def __init__(
        self,
        path: str | None = None,
        format: Format = "auto",
        image_width: int | None = None,
        downscale: float = 1.0,
        background: tuple[float, float, float] = (1.0, 1.0, 1.0),
        test_every: int = 8,
        num_init_points: int | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        undistort_cache: bool = True,
        undistort_cache_dir: str | None = None,
        image_storage: StorageMode = "auto",
        image_cache_bytes: int = 1 << 30,
        image_disk_cache: bool = True,
        image_cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if format in ("blender", "colmap", "nerfstudio") and path is None:
            raise ValueError(f"GaussianSplattingDataModule: format={format!r} needs a dataset folder: pass --data.path")
        if format == "demo" and path is not None:
            raise ValueError(f"GaussianSplattingDataModule: the demo scene is generated in code; got path={path!r}")
        if test_every < 2:
            raise ValueError(f"GaussianSplattingDataModule: test_every must be >= 2, got {test_every}")
        self.path = None if path is None else Path(path)
        self.format = format
        self.image_width = image_width
        self.downscale = downscale
        self._background = torch.tensor(background, dtype=torch.float32)
        self.test_every = test_every
        self.num_init_points = num_init_points
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.undistort_cache = DecodedImageCache(undistort_cache_dir) if undistort_cache else None
        disk_cache = DecodedImageCache(image_cache_dir, kind="images") if image_disk_cache else None
        self.image_storage = ImageStorage(image_storage, image_cache_bytes, disk_cache)
        self._scene: SceneData | None = None

    def resolved_format(self) -> Literal["blender", "colmap", "nerfstudio", "demo"]:
        if self.format != "auto":
            return self.format
        return "demo" if self.path is None else detect_format(self.path)

    def _load(self) -> SceneData:
        kind = self.resolved_format()
        if kind == "blender":
            count = BLENDER_INIT_POINTS if self.num_init_points is None else self.num_init_points
            return load_blender_scene(self.path, self.image_width, self.downscale, count, self.seed,
                                      self.image_storage)
        if kind == "colmap":
            return load_colmap_scene(self.path, self.image_width, self.downscale, self.test_every, self.undistort_cache,
                                     self.image_storage)
        if kind == "nerfstudio":
            count = BLENDER_INIT_POINTS if self.num_init_points is None else self.num_init_points
            return load_nerfstudio_scene(self.path, self.image_width, self.downscale, self.test_every, count,
                                         self.seed, self.undistort_cache, self.image_storage)
        count = DEMO_INIT_POINTS if self.num_init_points is None else self.num_init_points
        return make_demo_scene(self.image_width, self.downscale, self.seed, num_points=count)

    def setup(self, stage: str | None = None) -> None:
        """Decode the whole scene once; later stages reuse it."""
        if self._scene is None:
            self._scene = self._load()

    def teardown(self, stage: str | None = None) -> None:
        """End the streamed splits' prefetch threads (a loader abandoned mid-pass may have left one)."""
        if self._scene is not None:
            for split in (self._scene.train, self._scene.val, self._scene.test):
                if isinstance(split.images, StreamedImages):
                    split.images.stop_prefetching()

    @property
    def scene(self) -> SceneData:
        """The decoded scene; accessors load it on first use, so they also work before ``setup``."""
        self.setup()
        return self._scene

    @property
    def background(self) -> Tensor:
        """Render background colour [3] in [0, 1]."""
        return self._background.clone()

    def initial_points(self) -> tuple[Tensor, Tensor]:
        """Initial Gaussian centres [N, 3] and colours [N, 3] in [0, 1]."""
        return self.scene.points, self.scene.colors

    def train_cameras(self) -> Cameras:
        """All training cameras (for the 3DGS scene extent)."""
        return self.scene.train.cameras

    def _dataset(self, split: ImageSplit) -> PosedImageDataset:
        return PosedImageDataset(split, self._background)

    def _sampler(self, split: ImageSplit, sampler: Sampler[int], batch_size: int) -> Sampler[int]:
        """A streamed split's sampler prefetches the next batch (DataLoader workers prefetch by themselves)."""
        if isinstance(split.images, StreamedImages) and self.num_workers == 0:
            return PrefetchingSampler(sampler, split.images, batch_size)
        return sampler

    def train_dataloader(self) -> DataLoader:
        """Streamed without workers, the batches' images are :class:`~.rows.RowImages`: a Grendel rank reads only
        the rows it renders (the same values; see :mod:`.rows`)."""
        generator = torch.Generator().manual_seed(self.seed)
        rows_on_demand = isinstance(self.scene.train.images, StreamedImages) and self.num_workers == 0
        dataset = PosedImageDataset(self.scene.train, self._background, rows_on_demand)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self._sampler(self.scene.train, RandomSampler(dataset, generator=generator), self.batch_size),
            generator=generator,  # what shuffle=True would pass: the same draws, so the same order
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=CollateRows(dataset) if rows_on_demand else None,
        )

    def _eval_loader(self, split: ImageSplit) -> DataLoader:
        dataset = self._dataset(split)
        return DataLoader(dataset, batch_size=1, sampler=self._sampler(split, SequentialSampler(dataset), 1),
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.scene.val)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.scene.test)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.scene.test)

"""OrbitPreview: at the end of training, the scene from new viewpoints in TensorBoard.

Renders a short orbit (default 8 frames at most 128 px wide) around the point the training cameras look
at, and logs it as a frame strip (``add_image``) and an animated GIF clip (an image summary holding GIF
bytes, which TensorBoard plays; this needs no moviepy). Every rank renders, because under GrendelStrategy
``render_views`` is a collective; only rank 0 logs.
"""

from __future__ import annotations

import io

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from lightning_grendel.splatting.viewer.camera_paths import orbit_path


class OrbitPreview(Callback):
    """Log an orbit of the trained scene to TensorBoard at the end of ``fit``.

    Args:
        frames: orbit frames (views around the scene centre).
        width: frame width in pixels (at most the dataset's; height keeps the aspect).
        fps: playback rate of the GIF clip.
    """

    def __init__(self, frames: int = 8, width: int = 128, fps: float = 4.0) -> None:
        if frames < 1 or width < 1 or fps <= 0:
            raise ValueError(f"OrbitPreview: frames, width and fps must be positive, got {frames}, {width}, {fps}")
        self.frames = frames
        self.width = width
        self.fps = fps

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "train_cameras") or not hasattr(pl_module, "render_views"):
            return
        cameras = datamodule.train_cameras()
        path = orbit_path(cameras, self.frames, min(self.width, cameras.width)).to(pl_module.device)
        frames = [pl_module.render_views(path[i])[0].clamp(0, 1).cpu() for i in range(len(path))]
        if trainer.is_global_zero and isinstance(trainer.logger, TensorBoardLogger):
            self._log(trainer.logger, frames, trainer.global_step)

    def _log(self, logger: TensorBoardLogger, frames: list[torch.Tensor], step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        writer = logger.experiment
        writer.add_image("orbit/strip", torch.cat(frames, dim=1).permute(2, 0, 1), step)
        images = [Image.fromarray((frame * 255).round().to(torch.uint8).numpy()) for frame in frames]
        buffer = io.BytesIO()
        images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                       duration=round(1000 / self.fps), loop=0)
        height, width = frames[0].shape[:2]
        clip = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=buffer.getvalue())
        writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag="orbit/clip", image=clip)]), step)
        writer.flush()

"""``RunLogger``: TensorBoard under ``--trainer.default_root_dir``, so one flag moves all of a run's outputs.

Lightning's ``TensorBoardLogger`` needs its ``save_dir`` spelled out, so a recipe that names one pins
the events to that folder whatever ``--trainer.default_root_dir`` says. The recipes use this logger
without a ``save_dir``; the ``lightning-grendel`` CLI fills it from the trainer's root directory.
``DiscardEmptyRun`` removes the ``version_N`` folder of a run that failed before its first step, so
the next run gets the number the failed one took.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

_BOOKKEEPING = ("events.out.tfevents.", "hparams.yaml", "config.yaml")  # what a run writes before its first step


class RunLogger(TensorBoardLogger):
    """TensorBoard events, hyper-parameters and ``config.yaml`` in ``<save_dir>/<name>/version_N``.

    Args:
        name: the run's folder under the root directory (``blender``, ``grendel_cpu``, ...).
        save_dir: root directory; ``None`` (the recipes' choice) means ``--trainer.default_root_dir``
            (the current directory when that is unset, as for Lightning's own default logger).
        version: a fixed version (int or folder name) instead of the next free ``version_N``.
        default_hp_metric: log Lightning's placeholder ``hp_metric`` (off: the modules log real metrics).
    """

    def __init__(self, name: str = "lightning_logs", save_dir: str | None = None, version: int | str | None = None,
                 default_hp_metric: bool = False, **kwargs: Any) -> None:
        super().__init__(save_dir if save_dir is not None else ".", name=name, version=version,
                         default_hp_metric=default_hp_metric, **kwargs)


class DiscardEmptyRun(Callback):
    """On a ``fit`` that fails before its first optimizer step, remove the loggers' run folders it created.

    Such a folder holds only an events file (and perhaps ``hparams.yaml`` / ``config.yaml``); left
    behind, it would push the next run to ``version_1``. Folders that existed before the run, or that
    hold anything else (a checkpoint), are kept. Created before ``fit`` starts, when the loggers'
    folders are chosen but not yet made.
    """

    def __init__(self, trainer: Trainer) -> None:
        folders = [Path(logger.log_dir).absolute() for logger in trainer.loggers if getattr(logger, "log_dir", None)]
        self.created = {folder: _outermost_missing(folder) for folder in folders if not folder.exists()}

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.global_step > 0 or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.finalize("failed")  # closes the event files before their folder goes
        for folder, outermost in self.created.items():
            if folder.is_dir() and all(path.name.startswith(_BOOKKEEPING) for path in folder.iterdir()):
                shutil.rmtree(folder, ignore_errors=True)
                while folder != outermost and not any(folder.parent.iterdir()):  # and the parents it made
                    folder = folder.parent
                    folder.rmdir()


def _outermost_missing(folder: Path) -> Path:
    while not folder.parent.exists():
        folder = folder.parent
    return folder

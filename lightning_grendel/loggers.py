"""``RunLogger``: TensorBoard under ``--trainer.default_root_dir``, so one flag moves all of a run's outputs.

Lightning's ``TensorBoardLogger`` needs its ``save_dir`` spelled out, so a recipe that names one pins
the events to that folder whatever ``--trainer.default_root_dir`` says. The recipes use this logger
without a ``save_dir``; the ``lightning-grendel`` CLI fills it from the trainer's root directory.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger


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

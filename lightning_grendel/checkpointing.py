"""``LastCheckpoint``: Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` always holds the end of ``fit``.

``ModelCheckpoint`` writes ``last.ckpt`` only beside a periodic save, so a run whose ``max_steps`` (or
``max_time``, or an early stop) falls between two saves ends with an older ``last.ckpt``, or none at
all. This subclass saves it once more when training ends, unless the last step is already saved.

The shipped recipes save periodically by epoch (at the end of validation), not with
``every_n_train_steps``: under manual optimization, which every ``GaussianSplattingModule`` uses,
Lightning warns at each such save that the checkpoint holds the state *after* the optimizer step and
asks for the state before it to be kept aside. The state after the step is the one a checkpoint must
hold (it goes with the optimizer's moments and the step count, as under automatic optimization), so
the recipes use a trigger the warning does not apply to rather than saving a second copy of the model.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` (with ``save_last``) when ``fit`` ends between saves.

    Args:
        dirpath: folder of the checkpoints (default: ``<logger's run folder>/checkpoints``).
        filename: name pattern of the periodic / top-k checkpoints (default ``{epoch}-{step}``).
        monitor: metric that ranks the top-k checkpoints (``None``: keep the latest).
        verbose: log each save.
        save_last: also keep ``last.ckpt``, the newest state (the point of this class: set it).
        save_top_k: how many ranked checkpoints to keep (-1: all, 0: none).
        save_on_exception: save when ``fit`` raises.
        save_weights_only: leave the optimizer and loop state out.
        mode: ``min`` or ``max`` of ``monitor``.
        auto_insert_metric_name: write ``name=value`` into the file name.
        every_n_train_steps: save every N optimizer steps (not in the recipes: see the module docstring).
        train_time_interval: save at this wall-clock interval.
        every_n_epochs: save every N epochs (at the end of validation when validation runs).
        save_on_train_epoch_end: save at the end of the training epoch instead of after validation.
        enable_version_counter: add ``-v1``... to a name that exists already.
    """

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

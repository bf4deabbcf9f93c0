"""Lightning glue: the module is whole again on every rank before any ``on_*_end`` hook looks at it.

During a pipelined ``fit``, ``validate``, ``test`` or ``predict`` each rank holds only its stages'
weights (``residency.py``). Lightning calls the callbacks' end hooks first, then the module's, then
the strategy's; the strategy puts this callback first, so every one of them, and the user's code
after the Trainer call, sees every parameter's current value on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.trainer.states import TrainerFn


class WholeModelAtEnd(Callback):
    """Calls ``materialize`` (collective) when a Trainer call ends; validation inside ``fit`` is not an end."""

    def __init__(self, materialize: Callable[[], None]) -> None:
        self.materialize = materialize

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.materialize()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self.materialize()

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self.materialize()

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self.materialize()

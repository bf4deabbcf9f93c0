"""GrendelStrategy's launchers: Lightning's, preceded by the module's Trainer checks.

A Trainer flag the module refuses then fails once, in the launching process, before any rank starts
(``popen`` would otherwise start W copies of the script that each raise it; ``spawn`` would report it
from inside a worker).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

from lightning_grendel._process_group import _LeaveTogetherLauncher


class _CheckFirst:
    """``launch`` calls the module's ``check_trainer(trainer)``, when it has one, before the launcher's own.

    Lightning hands the launcher the trainer and the module (first argument of ``fit``, ``validate``,
    ``test``, ``predict``), so a refused flag is one error in this process: no rank starts, nothing is written.
    """

    def launch(self, function: Any, *args: Any, trainer: Trainer | None = None, **kwargs: Any) -> Any:
        check = getattr(args[0] if args else None, "check_trainer", None)
        if trainer is not None and callable(check):
            check(trainer)
        return super().launch(function, *args, trainer=trainer, **kwargs)  # type: ignore[misc]


class CheckedScriptLauncher(_CheckFirst, _SubprocessScriptLauncher):
    """Lightning's popen launcher (re-runs the script), after the module's check."""


class CheckedSpawnLauncher(_CheckFirst, _LeaveTogetherLauncher):
    """The spawn/fork launcher of :mod:`lightning_grendel._process_group`, after the module's check."""

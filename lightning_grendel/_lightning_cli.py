"""``GrendelCLI``: the LightningCLI behind ``lightning-grendel fit | validate | test | predict``.

Every module and data module of the package (and any the user's config names) by class path; recipe
names resolved to the shipped YAML files; jsonargparse errors raised rather than printed with the
whole usage, so the command reports them in one line (:mod:`lightning_grendel.cli`).
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_grendel._recipes import resolve_config_args
from lightning_grendel._registry import register_strategies
from lightning_grendel.cli import PROG, TRAINER_COMMANDS
from lightning_grendel.loggers import DiscardEmptyRun

# Printed on every run and about no run in particular: Lightning's advertisements, and deprecation
# notices of torch 2.14 about Lightning's and geoopt's own code (nothing a user of this command can change)
_ADVERTS = ("\N{ELECTRIC LIGHT BULB} Tip:",)
_LIBRARY_DEPRECATIONS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"`torch.jit.script` is deprecated")


def _quiet_library_notices() -> None:
    def not_an_advert(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ADVERTS)

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning_utilities.core.rank_zero"):
        logging.getLogger(name).addFilter(not_an_advert)
    for message in _LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message)


class GrendelCLI(LightningCLI):
    """LightningCLI that roots a :class:`~lightning_grendel.loggers.RunLogger` without a ``save_dir`` at
    ``--trainer.default_root_dir``, so that one flag moves events, checkpoints and ``config.yaml``, and
    removes the run folder of a ``fit`` that fails before its first step."""

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # main() always passes the arguments: LightningCLI's warning about args beside sys.argv is moot
        self.config = parser.parse_args(args)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.get("default_root_dir") or "."
        loggers = config.trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if getattr(logger, "class_path", "").endswith("RunLogger") and logger.init_args.get("save_dir") is None:
                logger.init_args.save_dir = str(root)

    def before_fit(self) -> None:
        self.trainer.callbacks.append(DiscardEmptyRun(self.trainer))


def cli(args: list[str] | None = None) -> LightningCLI:
    """The LightningCLI over every module and data module (``fit | validate | test | predict``)."""
    register_strategies()
    _quiet_library_notices()
    return GrendelCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": PROG, "exit_on_error": False,
                       **{name: {"exit_on_error": False} for name in TRAINER_COMMANDS}},
        args=resolve_config_args(sys.argv[1:] if args is None else args),
    )

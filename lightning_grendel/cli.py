"""The ``lightning-grendel`` command: LightningCLI over every module and data module of the package.

``lightning-grendel recipes`` lists the shipped recipes, ``lightning-grendel render`` renders a trained
Gaussian scene (see ``render --help``); ``-c NAME`` accepts a listed name as well as a
path, so a wheel install runs them without a clone.
"""

from __future__ import annotations

import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from lightning_grendel._process_group import leave_process_group
from lightning_grendel._recipes import format_recipe_list, resolve_config_args
from lightning_grendel._registry import register_strategies


class GrendelCLI(LightningCLI):
    """LightningCLI that roots a :class:`~lightning_grendel.loggers.RunLogger` without a ``save_dir`` at
    ``--trainer.default_root_dir``, so that one flag moves events, checkpoints and ``config.yaml``."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.get("default_root_dir") or "."
        loggers = config.trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if getattr(logger, "class_path", "").endswith("RunLogger") and logger.init_args.get("save_dir") is None:
                logger.init_args.save_dir = str(root)


def cli(args: list[str] | None = None) -> LightningCLI:
    """The LightningCLI over every module and data module (``fit | validate | test | predict``)."""
    register_strategies()
    if args is None:  # LightningCLI reads sys.argv itself; resolve recipe names there
        sys.argv[1:] = resolve_config_args(sys.argv[1:])
    else:
        args = resolve_config_args(args)
    return GrendelCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(args: list[str] | None = None) -> None:
    """Console-script entry point: ``recipes`` lists the recipes, anything else runs the CLI."""
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["recipes"]:
        print(format_recipe_list())
        return
    if argv[:1] == ["render"]:  # imported here: the render command pulls in OpenCV and the splatting stack
        from lightning_grendel.splatting.viewer.render_command import main as render_main

        render_main(argv[1:])
        return
    if argv[:1] == ["export"]:
        from lightning_grendel.splatting.viewer.export_command import main as export_main

        export_main(argv[1:])
        return
    if argv[:1] == ["view"]:
        from lightning_grendel.splatting.viewer.view_command import main as view_main

        view_main(argv[1:])
        return
    cli(argv)
    leave_process_group()  # every rank runs this command: they leave gloo together rather than at exit


if __name__ == "__main__":
    main()

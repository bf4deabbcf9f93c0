"""The ``lightning-grendel`` command: LightningCLI over every module and data module of the package.

``lightning-grendel recipes`` lists the shipped recipes; ``-c NAME`` accepts a listed name as well as a
path, so a wheel install runs them without a clone.
"""

from __future__ import annotations

import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from lightning_grendel._recipes import format_recipe_list, resolve_config_args
from lightning_grendel._registry import register_strategies


def cli(args: list[str] | None = None) -> LightningCLI:
    """The LightningCLI over every module and data module (``fit | validate | test | predict``)."""
    register_strategies()
    args = resolve_config_args(sys.argv[1:] if args is None else args)
    return LightningCLI(
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
    cli(argv)


if __name__ == "__main__":
    main()

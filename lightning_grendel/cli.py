"""The ``lightning-grendel`` command: LightningCLI over every module and data module of the package."""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

import lightning_grendel  # noqa: F401  (registers the strategies by name)


def cli(args: list[str] | None = None) -> LightningCLI:
    """The LightningCLI over every module and data module (``fit | validate | test | predict``)."""
    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(args: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI; the exit status is 0 unless it raised."""
    cli(args)


if __name__ == "__main__":
    main()

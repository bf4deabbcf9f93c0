"""The ``lightning-grendel`` command: LightningCLI over every module and data module of the package."""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

import lightning_grendel  # noqa: F401  (registers the strategies by name)


def main(args: list[str] | None = None) -> LightningCLI:
    """Run ``fit | validate | test | predict`` from recipe YAMLs (``-c recipe.yaml``)."""
    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()

"""``python -m lightning_grendel`` is the same as the ``lightning-grendel`` console script."""

from lightning_grendel.cli import main

if __name__ == "__main__":
    main()

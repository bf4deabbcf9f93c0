"""The former name of ``python -m lightning_grendel.splatting.build``, which builds every C++ extension."""

from __future__ import annotations

import sys

from lightning_grendel.splatting.build import main

if __name__ == "__main__":
    sys.exit(main())

"""Build the C++ rasterizer and projection ahead of time: ``python -m lightning_grendel.splatting.rasterize.build``.

``make test`` runs this first so that no test pays (or times out on) the one-off compile.
"""

from __future__ import annotations

import sys

from lightning_grendel.splatting import fused_projection
from lightning_grendel.splatting.rasterize.cpp_backend import build_directory, load_extension


def main() -> int:
    """Exit status 0 when both extensions are built and importable, 1 otherwise (the warnings say why)."""
    module = load_extension()
    if module is None:
        return 1
    print(f"C++ rasterizer ready: {module.__file__} (build folder {build_directory()})")
    projection = fused_projection.load_extension()
    if projection is None:
        return 1
    print(f"C++ projection ready: {projection.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build the C++ rasterizer ahead of time: ``python -m lightning_grendel.splatting.rasterize.build``.

``make test`` runs this first so that no test pays (or times out on) the one-off compile.
"""

from __future__ import annotations

import sys

from lightning_grendel.splatting.rasterize.cpp_backend import build_directory, load_extension


def main() -> int:
    """Exit status 0 when the extension is built and importable, 1 otherwise (the warning says why)."""
    module = load_extension()
    if module is None:
        return 1
    print(f"C++ rasterizer ready: {module.__file__} (build folder {build_directory()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

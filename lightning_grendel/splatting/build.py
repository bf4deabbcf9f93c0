"""Compile every C++ extension ahead of time: ``python -m lightning_grendel.splatting.build``.

Builds the rasterizer, the fused projection and the fused SSIM loss (what a first CPU ``fit`` would
otherwise compile) and the hyperbolic Lorentz Adam and knowledge-graph lookups, and prints each one's
state and build folder. ``make test`` runs it first so that no test pays (or times out on) the one-off
compile.
"""

from __future__ import annotations

import sys

from lightning_grendel.splatting.cpp_build import (
    ALL_EXTENSIONS,
    build_extensions,
    extension_directory,
    load_cpp_extension,
)


def main() -> int:
    """Exit status 0 when every extension is built and importable, 1 otherwise (the warnings say why)."""
    compiled = build_extensions(ALL_EXTENSIONS)
    for extension in ALL_EXTENSIONS:
        module = load_cpp_extension(extension)
        state = "FAILED" if module is None else "compiled" if compiled[extension] else "already built"
        print(f"{extension.name}: {state} in {extension_directory(extension)}")
    return 0 if all(load_cpp_extension(e) is not None for e in ALL_EXTENSIONS) else 1


if __name__ == "__main__":
    sys.exit(main())

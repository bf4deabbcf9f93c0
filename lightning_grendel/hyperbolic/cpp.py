"""The hyperbolic package's C++ kernels (``csrc/``), compiled on first use by the package's extension builder.

Each is built alone (a knowledge-graph run need not compile the splatting kernels) and cached like
those (:mod:`lightning_grendel.splatting.cpp_build`); ``None`` after one warning when it cannot be
built, and the callers fall back to their PyTorch reference code.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

from lightning_grendel.splatting.cpp_build import CppExtension, build_extensions, load_cpp_extension

_CSRC = Path(__file__).resolve().parent / "csrc"
LORENTZ_ADAM = CppExtension("lightning_grendel_lorentz_adam", (_CSRC / "lorentz_adam.cpp",), compile_cpu_seconds=25)
KG_OPS = CppExtension("lightning_grendel_kg_ops", (_CSRC / "kg_ops.cpp",), compile_cpu_seconds=25)
EXTENSIONS = (LORENTZ_ADAM, KG_OPS)


@functools.cache
def load(extension: CppExtension) -> ModuleType | None:
    """The compiled module, or ``None`` when it cannot be built (warned about once)."""
    build_extensions([extension])
    return load_cpp_extension(extension)

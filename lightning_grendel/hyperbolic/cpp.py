"""The hyperbolic package's C++ kernels (``csrc/``), compiled on first use by the package's extension builder.

They are cached, announced and prebuilt (``python -m lightning_grendel.splatting.build``) like the
splatting kernels (:mod:`lightning_grendel.splatting.cpp_build`, which defines them), as a family of
their own: a knowledge-graph run's first compile builds both and no splatting kernel. ``None`` after one
warning when one cannot be built, and the callers fall back to their PyTorch reference code.
"""

from __future__ import annotations

from types import ModuleType

from lightning_grendel.splatting.cpp_build import (
    HYPERBOLIC_EXTENSIONS,
    KG_OPS,
    LORENTZ_ADAM,
    CppExtension,
    load_cpp_extension,
)

__all__ = ["KG_OPS", "LORENTZ_ADAM", "load"]


def load(extension: CppExtension) -> ModuleType | None:
    """The compiled module, or ``None`` when it cannot be built (warned about once per process)."""
    return load_cpp_extension(extension, family=HYPERBOLIC_EXTENSIONS)

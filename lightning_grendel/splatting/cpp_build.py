"""Compile and load the package's C++ extensions, once per kind of CPU.

Extensions are built with ``torch.utils.cpp_extension.load`` (ninja) for the CPU that builds them
(``-march=native`` unless ``LIGHTNING_GRENDEL_MARCH`` names another target, e.g. ``x86-64-v3``) and cached
in a folder keyed by Python, torch, the target and a hash of the CPU's model and feature flags, so a home
directory shared across a cluster never loads a build made for a different CPU. A failed build warns once,
naming the file with the compiler output, and yields ``None`` so that callers fall back to PyTorch.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

BASE_CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")
_CPUINFO = Path("/proc/cpuinfo")


def march() -> str:
    """The ``-march`` target: ``native`` by default, or ``$LIGHTNING_GRENDEL_MARCH``."""
    return os.environ.get("LIGHTNING_GRENDEL_MARCH", "native")


def cpu_signature(cpuinfo: Path = _CPUINFO) -> str:
    """A short hash of the CPU model and its feature flags (the machine name where /proc is absent)."""
    wanted = ("model name", "flags", "Features", "CPU part")
    lines: list[str] = []
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key = line.split(":", 1)[0].strip()
            if key in wanted and line not in lines:
                lines.append(line)
    text = "\n".join(lines) or f"{platform.machine()} {platform.processor()}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_root() -> Path:
    """``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/lightning_grendel/torch_extensions``."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "lightning_grendel" / "torch_extensions"


def extension_directory(name: str) -> Path:
    """The build folder of extension ``name`` for this Python, torch, ``-march`` target and CPU."""
    version = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.split('+')[0]}"
    return cache_root() / version / f"{name}_{march()}_{cpu_signature()}"


_loaded: dict[str, ModuleType | None] = {}  # one build attempt per extension and process


def load_cpp_extension(name: str, sources: Sequence[Path]) -> ModuleType | None:
    """The compiled module ``name`` (building it the first time), or ``None`` after one warning."""
    if name not in _loaded:
        _loaded[name] = _build(name, sources)
    return _loaded[name]


def _build(name: str, sources: Sequence[Path]) -> ModuleType | None:
    from torch.utils.cpp_extension import load

    directory = extension_directory(name)
    directory.mkdir(parents=True, exist_ok=True)
    log_file = directory / "build_error.log"
    cflags = [*BASE_CFLAGS, f"-march={march()}"]
    try:
        module = load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as error:
        log_file.write_text(f"building {', '.join(map(str, sources))} with {' '.join(cflags)} failed:\n{error}\n")
        warnings.warn(
            f"lightning_grendel: could not build the C++ extension {name} (compiler output in {log_file}); "
            "falling back to the slower PyTorch code",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    log_file.unlink(missing_ok=True)
    return module

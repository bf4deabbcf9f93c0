"""Compile and load the package's C++ extensions: once per torch installation, source version and kind of CPU.

Each extension is built with ``torch.utils.cpp_extension.load`` (ninja) for the CPU that builds it
(``-march=native`` unless ``LIGHTNING_GRENDEL_MARCH`` names another target, e.g. ``x86-64-v3``) into a
folder of its own under :func:`cache_root`, named by

- the torch installation: Python version, torch's full version (local tag included) and a hash of its
  install path and build commit, so two virtual environments never load or rebuild each other's builds;
- a hash of the sources (headers included) and the compiler flags, so two clones at different commits never do;
- ``-march`` and a hash of the CPU's model and feature flags, so a home directory shared across a cluster
  never loads a build made for a different CPU.

A folder is built once and never rebuilt. A process that finds no ``built.json`` in it takes an exclusive
``flock`` on its ``build.lock`` (the kernel releases it if the process dies), looks again, clears what an
interrupted build left, compiles, imports the module and only then writes ``built.json``; every other
process imports the ``.so`` that ``built.json`` names, without ninja and without the lock. So ranks, test
suites and clones that start at once build each folder once, wait for it rather than fight, and never
rewrite a module another process has loaded.

The first compile in a process builds every extension of its family still missing (one pause, not three),
announced by one line before it starts and one when it is done. A failed build warns once, naming the file
with the compiler output, and yields ``None`` so that callers fall back to PyTorch.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO

import torch

log = logging.getLogger(__name__)

BASE_CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")
LDFLAGS = ("-fopenmp",)
HEADER_SUFFIXES = (".h", ".hpp")
_CPUINFO = Path("/proc/cpuinfo")
_BUILT = "built.json"  # written last: its presence means the folder holds a complete, importable build
_LOCK = "build.lock"


@dataclass(frozen=True)
class CppExtension:
    """One C++ extension of the package.

    Args:
        name: the Python module name the sources define (``TORCH_EXTENSION_NAME``).
        sources: its ``.cpp`` files; the headers beside them are part of its source hash.
        compile_cpu_seconds: CPU time its compile took on the 2-core reference machine (docs/3dgs.md),
            the basis of the "about N min" estimate.
    """

    name: str
    sources: tuple[Path, ...]
    compile_cpu_seconds: float


_SPLATTING = Path(__file__).resolve().parent
_RASTERIZE_CSRC = _SPLATTING / "rasterize" / "csrc"
RASTERIZE = CppExtension(
    "lightning_grendel_rasterize",
    (_RASTERIZE_CSRC / "rasterize.cpp",
     *(_RASTERIZE_CSRC / f"simd_{part}.cpp" for part in ("bins", "forward", "backward", "glue"))),
    compile_cpu_seconds=60,
)
PROJECTION = CppExtension("lightning_grendel_project", (_SPLATTING / "csrc" / "project.cpp",), compile_cpu_seconds=24)
SSIM = CppExtension("lightning_grendel_ssim", (_SPLATTING / "csrc" / "ssim.cpp",), compile_cpu_seconds=23)
EXTENSIONS = (RASTERIZE, PROJECTION, SSIM)  # what a splatting run's first compile builds
_HYPERBOLIC_CSRC = _SPLATTING.parent / "hyperbolic" / "csrc"
LORENTZ_ADAM = CppExtension("lightning_grendel_lorentz_adam", (_HYPERBOLIC_CSRC / "lorentz_adam.cpp",),
                            compile_cpu_seconds=37)
KG_OPS = CppExtension("lightning_grendel_kg_ops", (_HYPERBOLIC_CSRC / "kg_ops.cpp",), compile_cpu_seconds=31)
HYPERBOLIC_EXTENSIONS = (LORENTZ_ADAM, KG_OPS)  # a knowledge-graph run's: it compiles no splatting kernel
ALL_EXTENSIONS = (*EXTENSIONS, *HYPERBOLIC_EXTENSIONS)  # what the prebuild command builds


def march() -> str:
    """The ``-march`` target: ``native`` by default, or ``$LIGHTNING_GRENDEL_MARCH``."""
    return os.environ.get("LIGHTNING_GRENDEL_MARCH", "native")


def cflags() -> list[str]:
    """The compiler flags of every extension."""
    return [*BASE_CFLAGS, f"-march={march()}"]


def _short_hash(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def cpu_signature(cpuinfo: Path = _CPUINFO) -> str:
    """A short hash of the CPU model and its feature flags (the machine name where /proc is absent)."""
    wanted = ("model name", "flags", "Features", "CPU part")
    lines: list[str] = []
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key = line.split(":", 1)[0].strip()
            if key in wanted and line not in lines:
                lines.append(line)
    return _short_hash("\n".join(lines) or f"{platform.machine()} {platform.processor()}")


def torch_signature() -> str:
    """``py311_torch2.14.1+cpu_<hash>``: Python, torch's full version, and a hash of its install path and commit."""
    install = Path(torch.__file__).resolve().parent
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    installation = _short_hash(str(install), torch.__version__, torch.version.git_version)
    return f"{python}_torch{torch.__version__}_{installation}"


def source_signature(extension: CppExtension) -> str:
    """A hash of the extension's sources, the headers beside them and the compiler flags."""
    folders = sorted({source.parent for source in extension.sources})
    headers = sorted(path for folder in folders for path in folder.iterdir() if path.suffix in HEADER_SUFFIXES)
    parts: list[str | bytes] = [*cflags(), *LDFLAGS]
    for path in [*extension.sources, *headers]:
        parts += [path.name, path.read_bytes()]
    return _short_hash(*parts)


def cache_root() -> Path:
    """``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/lightning_grendel/torch_extensions``."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "lightning_grendel" / "torch_extensions"


def extension_directory(extension: CppExtension) -> Path:
    """The build folder of ``extension`` for this torch installation, these sources, ``-march`` target and CPU."""
    leaf = f"{extension.name}_{march()}_{cpu_signature()}_{source_signature(extension)}"
    return cache_root() / torch_signature() / leaf


_loaded: dict[CppExtension, ModuleType | None] = {}  # one build attempt per extension and process


def load_cpp_extension(extension: CppExtension, family: Sequence[CppExtension] | None = None) -> ModuleType | None:
    """The compiled module, or ``None`` after a warning.

    A compile builds the missing members of ``family`` with it (one pause, not several): the splatting
    kernels (:data:`EXTENSIONS`) by default; the hyperbolic kernels pass :data:`HYPERBOLIC_EXTENSIONS`.
    """
    if extension not in _loaded:
        module = _import_built(extension_directory(extension))
        if module is not None:
            _loaded[extension] = module
        else:
            family = EXTENSIONS if family is None else family
            build_extensions([extension, *(e for e in family if e != extension and e not in _loaded)])
    return _loaded[extension]


def build_extensions(extensions: Sequence[CppExtension]) -> dict[CppExtension, bool]:
    """Load each extension, compiling those not built yet; returns which ones this process compiled.

    Logs one line before the first compile (with an estimate for what is left) and one after the last.
    """
    run = _Run()
    compiled: dict[CppExtension, bool] = {}
    for index, extension in enumerate(extensions):
        _loaded[extension], compiled[extension] = _build(extension, extensions[index:], run)
    if run.started is not None:
        built = [e.name for e, done in compiled.items() if done and _loaded[e] is not None]
        failed = [e.name for e, done in compiled.items() if done and _loaded[e] is None]
        outcome = f"; {', '.join(failed)} failed (see the warning)" if failed else ""
        _announce(f"compiled the C++ kernels in {time.perf_counter() - run.started:.0f} s "
                  f"({', '.join(built) or 'none'}{outcome})")
    return compiled


@dataclass
class _Run:
    """What one :func:`build_extensions` call has said so far: the start line (and when), a wait."""

    started: float | None = None
    waited: bool = False


def _build(extension: CppExtension, remaining: Sequence[CppExtension], run: _Run) -> tuple[ModuleType | None, bool]:
    """``(module, compiled here)``: the folder's build, compiled under its lock if there is none yet."""
    directory = extension_directory(extension)
    module = _import_built(directory)
    if module is not None:
        return module, False
    try:
        with _exclusive(directory, extension.name, say_wait=not run.waited) as waited:
            run.waited = run.waited or waited
            module = _import_built(directory)  # another process may have built it while this one waited
            if module is not None:
                return module, False
            if run.started is None:
                run.started = time.perf_counter()
                _announce_start(remaining)
            return _compile(extension, directory), True
    except OSError as error:  # the cache cannot be written (read-only, full, no permission)
        _warn_failed(extension, f"cannot build in {directory}: {error}")
        return None, False


def estimated_minutes(extensions: Sequence[CppExtension], cores: int | None = None, load: float | None = None) -> int:
    """Whole minutes to compile ``extensions`` here: each one's reference CPU time over the cores ninja can
    use on it, stretched by how busy the machine is (1-minute load average, plus this compile, per core)."""
    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    load = os.getloadavg()[0] if load is None else load
    seconds = sum(e.compile_cpu_seconds / min(cores, len(e.sources)) for e in extensions)
    return max(1, math.ceil(seconds * max(1.0, (load + 1) / cores) / 60))


def _announce_start(extensions: Sequence[CppExtension]) -> None:
    _announce(f"compiling the C++ kernels once, about {estimated_minutes(extensions)} min on this machine; "
              f"cached in {cache_root() / torch_signature()}")


def _rank_prefix() -> str:
    rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK")
    return f"rank {rank}: " if rank not in (None, "0") else ""


def _announce(message: str) -> None:
    """INFO where logging is configured; otherwise stderr, as Lightning's own messages appear in a plain script."""
    message = f"lightning_grendel: {_rank_prefix()}{message}"
    if log.hasHandlers():
        log.info(message)
    else:
        print(message, file=sys.stderr, flush=True)


def _import_built(directory: Path) -> ModuleType | None:
    """The module a complete build in ``directory`` holds, or ``None`` if there is none (or it does not load)."""
    try:
        built = json.loads((directory / _BUILT).read_text())
        spec = importlib.util.spec_from_file_location(built["module"], directory / built["file"])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (OSError, ValueError, KeyError, ImportError, AttributeError):
        return None
    return module


@contextmanager
def _exclusive(directory: Path, name: str, say_wait: bool = True) -> Iterator[bool]:
    """Hold ``directory/build.lock`` (an advisory ``flock``, released by the kernel if this process dies).

    Yields whether it had to wait for another process; ``say_wait`` logs that once (see :func:`_announce_wait`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / _LOCK, "a+") as handle:
        waited = False
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waited = True
            if say_wait:
                _announce_wait(handle, directory, name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.truncate(0)
        handle.write(f"{os.getpid()} {os.getppid()}\n")
        handle.flush()
        yield waited


def _announce_wait(handle: IO[str], directory: Path, name: str) -> None:
    """Say who is compiling, unless it is a sibling rank (its own line already says so)."""
    handle.seek(0)
    try:
        pid, parent = (int(field) for field in handle.read().split())
    except ValueError:  # written by no one yet, or half-written
        pid = parent = None
    if os.getppid() in (pid, parent) or parent == os.getpid():
        return
    who = f"process {pid}" if pid else "another process"
    _announce(f"waiting for {who}, which is compiling {name} in {directory}")


def _compile(extension: CppExtension, directory: Path) -> ModuleType | None:
    """Compile into ``directory`` (this process holds its lock), then mark it built; ``None`` after a warning."""
    for leftover in directory.iterdir():  # an interrupted build's objects, and older torch's stale ``lock`` file
        if leftover.name != _LOCK:
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    log_file = directory / "build_error.log"
    try:
        module = _torch_load()(
            name=extension.name,
            sources=[str(s) for s in extension.sources],
            extra_cflags=cflags(),
            extra_ldflags=list(LDFLAGS),
            build_directory=str(directory),
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as error:
        log_file.write_text(f"building {', '.join(map(str, extension.sources))} with {' '.join(cflags())} "
                            f"failed:\n{error}\n")
        _warn_failed(extension, f"compiler output in {log_file}")
        return None
    built = directory / _BUILT
    temporary = built.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps({"module": module.__name__, "file": Path(module.__file__).name}))
    temporary.replace(built)
    return module


def _warn_failed(extension: CppExtension, detail: str) -> None:
    warnings.warn(f"lightning_grendel: could not build the C++ extension {extension.name} ({detail}); "
                  "falling back to the slower PyTorch code", RuntimeWarning, stacklevel=6)


def _torch_load():
    """torch's ``load``, imported without its "No CUDA runtime is found" warning (CPU builds never use CUDA)."""
    torch_logger = logging.getLogger("torch.utils.cpp_extension")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        torch_logger.setLevel(level)
    return load

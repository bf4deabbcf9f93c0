"""The C++ extension cache: its key, one build per folder under concurrency, recovery, and what it logs.

Most tests build ``tiny``, a bare CPython module (no torch headers: it compiles in about a second) through
the same torch ``load`` path as the real extensions, in a folder of the test's own.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_grendel.splatting import cpp_build
from lightning_grendel.splatting.rasterize import cpp_backend, rasterize
from tests.helpers.scenes import projected_splats

TINY_SOURCE = """
#include <Python.h>
#define LG_CAT(a, b) a##b
#define LG_INIT(name) LG_CAT(PyInit_, name)
#define LG_STR2(name) #name
#define LG_STR(name) LG_STR2(name)
static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(ANSWER); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, ""}, {nullptr, nullptr, 0, nullptr}};
static PyModuleDef definition = {PyModuleDef_HEAD_INIT, LG_STR(TORCH_EXTENSION_NAME), "", -1, methods};
PyMODINIT_FUNC LG_INIT(TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&definition); }
"""
LOGGER = "lightning_grendel.splatting.cpp_build"
REPO = Path(__file__).resolve().parents[2]


def tiny_extension(folder: Path, name: str = "lg_test_tiny", answer: int = 42) -> cpp_build.CppExtension:
    """A one-file extension whose module's ``answer()`` returns ``answer`` (the header holds it)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.cpp").write_text('#include "answer.h"\n' + TINY_SOURCE)
    (folder / "answer.h").write_text(f"#define ANSWER {answer}\n")
    return cpp_build.CppExtension(name, (folder / "tiny.cpp",), compile_cpu_seconds=1)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh cache root for this test, and a process that has loaded nothing yet."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpp_build, "_loaded", {})
    monkeypatch.setattr(cpp_build, "EXTENSIONS", ())  # a first compile here builds no real extension alongside
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return tmp_path / "cache"


def python(code: str, *, cwd: Path = REPO, via_shell: bool = False, **kwargs) -> subprocess.Popen:
    """Start ``code`` in a fresh interpreter (through ``sh`` so it is not this process's child, if asked)."""
    command = [sys.executable, "-c", textwrap.dedent(code)]
    if via_shell:  # "; exit" stops sh from exec'ing python, so python's parent is sh, not this process
        command = ["sh", "-c", '"$0" "$@"; exit $?', *command]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def build_in_child(source_folder: Path, name: str = "lg_test_tiny", via_shell: bool = False) -> subprocess.Popen:
    """A child that loads or builds the tiny extension and prints whether it compiled and ``answer()``."""
    return python(f"""
        from pathlib import Path
        from lightning_grendel.splatting import cpp_build
        ext = cpp_build.CppExtension({name!r}, (Path({str(source_folder / "tiny.cpp")!r}),), 1)
        compiled = cpp_build.build_extensions([ext])[ext]
        print(compiled, cpp_build.load_cpp_extension(ext).answer())
    """, via_shell=via_shell)


@pytest.mark.timeout(120)
def test_the_folder_is_keyed_by_torch_installation_sources_cpu_and_march(tmp_path, monkeypatch):
    """Two venvs, two commits or two CPUs must never share a build folder; the same ones always do."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    ext = tiny_extension(tmp_path / "src")
    base = cpp_build.extension_directory(ext)
    assert base == cpp_build.extension_directory(tiny_extension(tmp_path / "src"))  # same inputs, same folder
    assert base.parent.parent == tmp_path and base.parent.name.startswith(f"py{sys.version_info[0]}")
    assert base.name.startswith("lg_test_tiny_native_")

    changed = [cpp_build.extension_directory(tiny_extension(tmp_path / "src", answer=43))]  # a header differs
    for target, name, value in [(torch, "__version__", torch.__version__ + "local"),  # another local tag
                                (torch, "__file__", str(tmp_path / "other_venv" / "torch" / "__init__.py"))]:
        with monkeypatch.context() as patch:
            patch.setattr(target, name, value)
            changed.append(cpp_build.extension_directory(ext))
    monkeypatch.setenv("LIGHTNING_GRENDEL_MARCH", "x86-64")
    changed.append(cpp_build.extension_directory(ext))
    assert len({base, *changed}) == 5

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu sse2 avx2 avx512f\n")
    avx512 = cpp_build.cpu_signature(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu sse2 avx2\n")
    assert cpp_build.cpu_signature(cpuinfo) != avx512


@pytest.mark.timeout(300)
def test_a_build_says_what_it_does_once_and_is_never_rebuilt(cache, tmp_path, caplog, monkeypatch):
    first = tiny_extension(tmp_path / "a", "lg_test_first", answer=1)
    second = tiny_extension(tmp_path / "b", "lg_test_second", answer=2)
    monkeypatch.setattr(cpp_build, "EXTENSIONS", (first, second))
    monkeypatch.setenv("RANK", "2")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert cpp_build.load_cpp_extension(second).answer() == 2  # compiles both: one pause, not two
        assert cpp_build.load_cpp_extension(first).answer() == 1
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 2, lines
    assert lines[0].startswith("lightning_grendel: rank 2: compiling the C++ kernels once, about 1 min")
    assert lines[0].endswith(f"cached in {cache / cpp_build.torch_signature()}")
    assert "compiled the C++ kernels in" in lines[1] and "(lg_test_second, lg_test_first)" in lines[1]

    library = next(cpp_build.extension_directory(first).glob("*.so"))
    before = library.stat()
    child = build_in_child(tmp_path / "a", "lg_test_first")  # another process: loads it, no ninja, writes nothing
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert out.split() == ["False", "1"] and "compiling" not in err
    assert (library.stat().st_ino, library.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@pytest.mark.timeout(300)
def test_concurrent_builders_wait_for_one_build(cache, tmp_path):
    """While this process holds the folder's lock, an unrelated process waits, says so, then loads our build."""
    ext = tiny_extension(tmp_path / "src")
    directory = cpp_build.extension_directory(ext)
    with cpp_build._exclusive(directory, ext.name):
        waiter = build_in_child(tmp_path / "src", via_shell=True)
        said = ""
        while "waiting" not in said and (line := waiter.stderr.readline()):  # said just before it blocks
            said += line
        assert f"waiting for process {os.getpid()}, which is compiling lg_test_tiny" in said, waiter.communicate()
        assert waiter.poll() is None
        assert cpp_build._compile(ext, directory).answer() == 42
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err
    assert out.split() == ["False", "42"]  # it loaded this process's build instead of compiling its own
    assert "compiling the C++ kernels" not in err


@pytest.mark.timeout(300)
def test_a_killed_build_and_its_leftovers_do_not_block_or_poison_the_next(cache, tmp_path):
    ext = tiny_extension(tmp_path / "src")
    directory = cpp_build.extension_directory(ext)
    holder = python(f"""
        from pathlib import Path
        from lightning_grendel.splatting import cpp_build
        with cpp_build._exclusive(Path({str(directory)!r}), "lg_test_tiny"):
            print("locked", flush=True)
            import time; time.sleep(600)
    """)
    assert holder.stdout.readline().strip() == "locked"
    for name, content in [("lg_test_tiny.so", "half a library"), ("tiny.o", "junk"), ("lock", "")]:
        (directory / name).write_text(content)  # "lock": the lock file older torch leaves when a build dies
    holder.send_signal(signal.SIGKILL)  # dies holding the lock, its build unfinished
    holder.communicate(timeout=30)
    assert cpp_build.build_extensions([ext]) == {ext: True}
    assert cpp_build.load_cpp_extension(ext).answer() == 42


@pytest.mark.timeout(300)
def test_failed_build_warns_once_and_falls_back_to_torch(cache, tmp_path, monkeypatch):
    broken = tmp_path / "rasterize.cpp"
    broken.write_text("this is not C++;\n")
    monkeypatch.setattr(cpp_backend, "EXTENSION", cpp_build.CppExtension("lightning_grendel_rasterize", (broken,), 1))
    scene = projected_splats(50, 24, 20, seed=1)
    with pytest.warns(RuntimeWarning, match="compiler output in .*build_error.log") as record:
        image = rasterize(**scene, width=24, height=20, backend="cpp")
        rasterize(**scene, width=24, height=20, backend="cpp")
    assert len(record) == 1
    assert "error" in (cpp_backend.build_directory() / "build_error.log").read_text()
    torch.testing.assert_close(image, rasterize(**scene, width=24, height=20, backend="torch"), rtol=0, atol=0)


def test_an_unwritable_cache_warns_and_falls_back(cache, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "a_file" / "cache"))  # cannot be a folder
    ext = tiny_extension(tmp_path / "src")
    with pytest.warns(RuntimeWarning, match="could not build the C\\+\\+ extension lg_test_tiny .cannot build in"):
        assert cpp_build.load_cpp_extension(ext) is None


def test_the_estimate_divides_each_compile_by_the_cores_ninja_can_use_and_the_load():
    minutes = cpp_build.estimated_minutes
    assert minutes(cpp_build.EXTENSIONS, cores=2, load=0.0) == 2  # 60/2 + 24 + 23 = 77 s
    assert minutes(cpp_build.EXTENSIONS, cores=16, load=0.0) == 1  # 60/5 + 24 + 23 = 59 s
    assert minutes(cpp_build.EXTENSIONS, cores=1, load=0.0) == 2  # 107 s
    assert minutes(cpp_build.EXTENSIONS, cores=2, load=5.0) == 4  # 77 s x (5 + 1) / 2 = 231 s


def test_a_first_compile_builds_its_own_family_and_the_prebuild_every_extension(cache, monkeypatch):
    """A knowledge-graph run compiles the hyperbolic kernels together and no splatting kernel (and vice versa)."""
    built: list[str] = []

    def fake_build(extension, remaining, run):  # records what would compile, compiles nothing
        built.append(extension.name)
        return object(), True

    monkeypatch.setattr(cpp_build, "_build", fake_build)
    monkeypatch.setattr(cpp_build, "EXTENSIONS", (cpp_build.RASTERIZE, cpp_build.SSIM))
    from lightning_grendel.hyperbolic import cpp

    assert cpp.load(cpp.KG_OPS) is not None
    assert built == ["lightning_grendel_kg_ops", "lightning_grendel_lorentz_adam"]
    assert cpp.load(cpp.LORENTZ_ADAM) is not None and len(built) == 2  # built with the first: no second pause
    cpp_build.load_cpp_extension(cpp_build.SSIM)
    assert built[2:] == ["lightning_grendel_ssim", "lightning_grendel_rasterize"]
    assert set(cpp_build.ALL_EXTENSIONS) == {cpp_build.RASTERIZE, cpp_build.PROJECTION, cpp_build.SSIM,
                                             cpp.LORENTZ_ADAM, cpp.KG_OPS}
    assert all(source.is_file() for e in cpp_build.ALL_EXTENSIONS for source in e.sources)

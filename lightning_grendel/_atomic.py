"""Write a file atomically: into a temporary file beside it, then one rename, so a reader never sees half.

The temporary file gets the permissions an ordinary ``open(path, "w")`` would give (0666 minus the
umask); ``tempfile.mkstemp`` alone would leave it 0600 (and ``mkdtemp`` a folder 0700), so
:func:`as_if_created` gives the same to anything else staged that way.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def as_if_created(path: str | os.PathLike) -> None:
    """Give a ``mkstemp`` file or ``mkdtemp`` folder the mode ``open``/``mkdir`` would (0666/0777 minus the umask)."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~_umask())


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path`` in one rename.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        as_if_created(temporary)
        with os.fdopen(handle, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise

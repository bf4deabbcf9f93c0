"""Which exception of a failed command is the user's to fix, and the one line that tells them.

The package checks its input where it is read and raises with a message that names the file, flag or
argument (``ValueError``, ``TypeError``, ``FileNotFoundError``, ``NotADirectoryError``, or one of its
own error classes). Lightning and jsonargparse often wrap such an error in their own (a class that
fails to instantiate becomes jsonargparse's "Does not validate against any of the Union subtypes");
the command prints the package's message alone, as ``error: <message>``. Anything else (a bug, an
error inside torch) keeps its traceback, as does every error under ``--traceback`` or ``LG_DEBUG=1``.
"""

from __future__ import annotations

import os
import re
import sys
from argparse import ArgumentError  # what jsonargparse raises (jsonargparse.ArgumentError is this class)
from collections.abc import Iterator
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
_INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what caused it, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def _raised_in_package(error: BaseException) -> bool:
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback is not None and Path(traceback.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


def user_error(error: BaseException) -> BaseException | None:
    """The outermost error in ``error``'s chain that the package raised about its input, or ``None``."""
    for candidate in _chain(error):
        if isinstance(candidate, ArgumentError):
            return candidate
        own_class = type(candidate).__module__.startswith("lightning_grendel.")
        if (own_class and isinstance(candidate, Exception)) or (
                isinstance(candidate, _INPUT_ERRORS) and _raised_in_package(candidate)):
            return candidate
    return None


def wants_traceback(argv: list[str]) -> bool:
    """``--traceback`` on the command line, or ``LG_DEBUG=1`` in the environment."""
    return "--traceback" in argv or os.environ.get("LG_DEBUG", "") not in ("", "0")


def _message(error: BaseException, command: str) -> str:
    """The message on one line; jsonargparse's own with the offending option first."""
    message = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, ArgumentError):
        return message
    if match := re.match(r'Parser key "([^"]+)": ?(.*)', message):
        return f"--{match[1]}: {match[2]}"
    if match := re.match(r"unrecognized arguments: (.*)", message, re.IGNORECASE):
        return f"{match[1]}: no such option (`lightning-grendel {command} --help` lists them)"
    return message


def error_line(error: BaseException, command: str = "COMMAND") -> str:
    """``error: <message>`` on one line; a rank other than 0 of a multi-process run says which it is."""
    message = _message(error, command)
    rank_zero = sys.modules.get("lightning.fabric.utilities.rank_zero")  # its rank: the strategy's global rank
    rank = getattr(getattr(rank_zero, "rank_zero_only", None), "rank", 0)
    return f"error{f' (rank {rank})' if rank else ''}: {message}"


def report(error: BaseException, command: str = "COMMAND") -> None:
    """Print :func:`error_line` to stderr."""
    sys.stderr.write(f"{error_line(error, command)}\n")
    sys.stderr.flush()

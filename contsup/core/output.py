"""Standard output kept for what a command reports: a plugin's prints go to standard error.

``contsup plan --json`` and ``contsup eval --json`` promise JSON on standard output and nothing
else; a plugin that prints when it is imported, registers its components or is called (a
``print``, or a write to file descriptor 1 by compiled code) would break that promise with exit
status 0. :func:`stdout_to_stderr` sends both to standard error for as long as it lasts.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator


def _flush(stream: object) -> None:
    try:
        stream.flush()  # type: ignore[attr-defined]
    except (OSError, ValueError, AttributeError):
        pass


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Inside: ``sys.stdout`` is ``sys.stderr`` and file descriptor 1 a copy of 2, so nothing
    written reaches standard output; both are put back afterwards."""
    _flush(sys.stdout)
    saved = None
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no file descriptor 1 (closed) or 2: only Python's level is redirected
        if saved is not None:
            os.close(saved)
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _flush(sys.stderr)
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


@contextlib.contextmanager
def stderr_silenced() -> Iterator[None]:
    """Inside: file descriptor 2 writes nowhere (compiled code's own logging, such as the C++
    backtraces torch's store prints for each connection it retries); put back afterwards."""
    _flush(sys.stderr)
    saved = None
    try:
        saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
    except OSError:
        if saved is not None:
            os.close(saved)
        saved = None
    try:
        yield
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)


__all__ = ["stdout_to_stderr", "stderr_silenced"]

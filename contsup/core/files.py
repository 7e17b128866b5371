"""Reading the files a user may point anywhere: only regular files, and only up to a size.

A path a recipe, a run directory or a command line names can be a FIFO (reading it waits for a
writer that never comes), a character device (``/dev/zero`` never ends) or a sparse file of
terabytes. Every file contsup reads on a user's word goes through :func:`read_file`: the file is
opened without blocking, checked to be a regular file on the open descriptor itself (no race
with a file swapped in between), and its size checked against a limit before a byte is read.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

MB = 1 << 20
RECIPE_LIMIT = 16 * MB  # a recipe is a few kilobytes; a sweep file or a resolved recipe too
SMALL_LIMIT = 64 * 1024  # a digest file, a lock file
JSON_LIMIT = 256 * MB  # classes.json, plugins.json, probe.json, weights.json
METRICS_LIMIT = 1 << 30  # metrics.jsonl: about 400 bytes an epoch, for up to a million epochs


class NotAFile(OSError):
    """A path that names something other than a regular file (a FIFO, a device, a socket): the
    user's input, so exit status 2 (:func:`contsup.errors.report_failure` reads ``exit_code``)."""

    exit_code = 2


class TooLarge(OSError):
    """A file larger than what it could be: its reader refuses it before reading (exit status 2)."""

    exit_code = 2


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (a named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _size(n: int) -> str:
    return f"{n / MB:,.0f} MB" if n >= MB else f"{n:,} bytes"


def open_regular(path: str | Path) -> int:
    """A read-only descriptor of ``path``, which must be a regular file: IsADirectoryError for a
    folder, :class:`NotAFile` for a FIFO or a device (opened without blocking, so a FIFO without
    a writer does not wait), the usual OSError when it cannot be opened."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        if not stat.S_ISREG(mode):
            raise NotAFile(errno.EINVAL, f"it is {_kind(mode)}, not a file", str(path))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_file(path: str | Path, limit: int | None = RECIPE_LIMIT, what: str = "a file") -> bytes:
    """The bytes of the regular file ``path``; :class:`TooLarge` when it holds more than
    ``limit`` bytes (None: no limit), saying that ``what`` is never that large."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if limit is not None and size > limit:
            raise TooLarge(errno.EINVAL, f"it holds {_size(size)}, more than {what} can ({_size(limit)})", str(path))
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if limit is not None and total > limit:  # it grew while read
                raise TooLarge(errno.EINVAL, f"it holds more than {what} can ({_size(limit)})", str(path))
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path: str | Path, limit: int | None = RECIPE_LIMIT, what: str = "a file") -> str:
    """:func:`read_file` decoded as UTF-8 (UnicodeDecodeError for other bytes)."""
    return read_file(path, limit, what).decode("utf-8")


def file_size(path: str | Path) -> int:
    """The size of the regular file ``path``, checked as :func:`open_regular` does."""
    fd = open_regular(path)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def is_regular(path: str | Path) -> bool:
    """Whether ``path`` is a regular file (following symbolic links), without opening it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


__all__ = ["NotAFile", "TooLarge", "open_regular", "read_file", "read_text", "file_size", "is_regular",
           "RECIPE_LIMIT", "SMALL_LIMIT", "JSON_LIMIT", "METRICS_LIMIT"]

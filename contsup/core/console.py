"""The ``contsup`` command's process: its output streams, the file-size limit, and a failure in a
third-party plugin's own code told in one line.

- Output under an ASCII locale (``LC_ALL=C`` without UTF-8 mode): a path or a message with
  ``é`` is written with a backslash escape instead of ending the command in a
  ``UnicodeEncodeError``; a file name with ``é`` that such a process cannot create is one line
  saying to run under a UTF-8 locale.
- ``ulimit -f``: the kernel sends SIGXFSZ to a process writing past the limit, which ends it
  on the spot, half a file written. Ignored, the write fails with ``EFBIG`` instead, which the
  run reports as any refused write (one line, what is kept, how to finish).
- A standard output that cannot be written (``> /dev/full``, a closed pipe): a run goes on
  without its printed lines (its results are in the run directory), one warning saying so;
  any other command ends with one line and exit status 1, as its output was its product.
- An exception raised inside a third-party plugin's code that escapes everything else (a
  module's ``forward`` failing in the middle of training) becomes one line naming the plugin,
  its distribution and where in its code (exit status 1), not a traceback into contsup.
"""

from __future__ import annotations

import errno
import importlib.metadata
import os
import signal
import sys
import traceback
from typing import Any, TextIO

from contsup.errors import one_line, reason

ENTRY_POINT_GROUP = "contsup"
LOST_OUTPUT = (errno.ENOSPC, errno.EPIPE, errno.EBADF, errno.EIO, errno.EDQUOT, errno.EFBIG)


def lenient_encoding(stream: Any) -> None:
    """Characters the stream's encoding lacks are written as backslash escapes, not an error."""
    try:
        stream.reconfigure(errors="backslashreplace")
    except (AttributeError, ValueError, OSError):
        pass


def ignore_file_size_signal() -> None:
    """Past ``ulimit -f`` a write fails with EFBIG (reported) instead of SIGXFSZ ending the process."""
    sigxfsz = getattr(signal, "SIGXFSZ", None)
    if sigxfsz is not None:
        try:
            signal.signal(sigxfsz, signal.SIG_IGN)
        except (ValueError, OSError):  # not the main thread
            pass


class LenientOutput:
    """A text stream whose writes may fail (a full disk behind it): the first failure is one
    warning on standard error, and everything after it is dropped, so a run is never stopped
    by the lines it prints. ``lost`` holds that failure."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.lost: OSError | None = None

    def _failed(self, exc: OSError) -> None:
        if self.lost is None:
            self.lost = exc
            print(f"warning: standard output cannot be written ({exc.strerror or exc}); the run goes on without "
                  f"its progress lines (its results are in the run directory)", file=sys.stderr, flush=True)

    def write(self, text: str) -> int:
        if self.lost is None:
            try:
                return self._stream.write(text)
            except OSError as exc:
                self._failed(exc)
            except ValueError:  # closed
                self._failed(OSError(errno.EBADF, "it is closed"))
        return len(text)

    def flush(self) -> None:
        if self.lost is None:
            try:
                self._stream.flush()
            except OSError as exc:
                self._failed(exc)
            except ValueError:
                self._failed(OSError(errno.EBADF, "it is closed"))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def finish_output() -> str | None:
    """Flush standard output at the end of a command; the one line to print when it cannot be
    written (None when all went out). Standard output is then left pointing nowhere, so the
    interpreter's own flush at exit finds nothing to complain about."""
    stream = sys.stdout
    if stream is None:
        return None
    lost = getattr(stream, "lost", None)
    try:
        stream.flush()
    except (OSError, ValueError) as exc:
        lost = exc if isinstance(exc, OSError) else OSError(errno.EBADF, "it is closed")
    if lost is None:
        return None
    try:
        sys.stdout = open(os.devnull, "w")
    except OSError:
        pass
    if isinstance(stream, LenientOutput):  # a run: said already, and its results are on disk
        return None
    return f"cannot write standard output ({lost.strerror or lost}); what the command printed is lost"


def plugin_sources() -> dict[str, tuple[str, str, str]]:
    """``{folder or file of a loaded third-party plugin: (name, distribution, version)}``."""
    out: dict[str, tuple[str, str, str]] = {}
    try:
        points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # noqa: BLE001 - a broken installation: nothing to name
        return out
    for ep in points:
        module = sys.modules.get(ep.value.split(":")[0].strip())
        path = getattr(module, "__file__", None)
        if not path:
            continue
        dist = getattr(ep, "dist", None)
        where = os.path.dirname(os.path.abspath(path)) if os.path.basename(path) == "__init__.py" else os.path.abspath(path)
        out[where] = (ep.name, getattr(dist, "name", None) or "?", getattr(dist, "version", None) or "?")
    return out


def blame(exc: BaseException) -> str | None:
    """One line for an exception raised inside a third-party plugin's code (its innermost frame
    there: file, line, function), naming the plugin and its distribution; None when no frame of
    the traceback is a plugin's."""
    sources = plugin_sources()
    if not sources:
        return None
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        name = os.path.abspath(frame.filename)
        for where, (plugin, dist, version) in sources.items():
            if name == where or name.startswith(where.rstrip(os.sep) + os.sep):
                return (
                    f"plugin '{plugin}' ({dist} {version}) failed: {type(exc).__name__}: {reason(exc, 200)} (at "
                    f"{os.path.basename(name)}, line {frame.lineno}, in {frame.name}); fix the plugin, or leave it out "
                    f"with CONTSUP_LOAD_PLUGINS (or uninstall {dist})"
                )
    return None


def report_blamed(exc: BaseException, stream: TextIO | None = None) -> int | None:
    """Print :func:`blame`'s line for ``exc`` and return exit status 1; None when no plugin is to blame."""
    line = blame(exc)
    if line is None:
        return None
    print(f"error: {one_line(line)}", file=stream or sys.stderr, flush=True)
    return 1


def report_unencodable(exc: UnicodeEncodeError, stream: TextIO | None = None) -> int:
    """One line for a name this process cannot write (file names in ASCII, the name with é): exit 2."""
    text = exc.object if isinstance(exc.object, str) else str(exc.object)
    print(f"error: {one_line(ascii(text))}: not a name this process can use, as its file names are {exc.encoding} "
          f"(an ASCII locale without Python's UTF-8 mode); run it under a UTF-8 locale (LC_ALL=C.UTF-8) or with "
          f"PYTHONUTF8=1", file=stream or sys.stderr, flush=True)
    return 2


__all__ = ["report_unencodable", "lenient_encoding", "ignore_file_size_signal", "LenientOutput", "finish_output", "blame", "report_blamed"]

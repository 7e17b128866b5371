"""Errors a user can fix: printed as one line per problem, exit status 2, never a traceback."""

from __future__ import annotations

import errno
import sys
from typing import Iterable, TextIO


def one_line(text: str) -> str:
    """``text`` with line breaks and other unprintable characters escaped (``\\n``, ``\\x85``), so a
    message quoting the user's input still prints as one line."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def reason(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as one short line (a heading line ending in ':' is dropped, as in
    torch's ``Error(s) in loading state_dict for ...:``)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]
    text = "; ".join(lines) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(exc: BaseException) -> str:
    """An exception's first non-blank line, or its type's name where it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ContsupError(Exception):
    """A problem with the user's input; ``lines`` are printed as they are."""

    exit_code = 2

    def __init__(self, *lines: str) -> None:
        self.lines = tuple(lines)
        super().__init__("\n".join(self.lines))

    def print(self, stream: TextIO | None = None) -> None:
        """Print each line after the error's label (``error:``, ``stopped:``), as the command line does."""
        stream = stream or sys.stderr
        label = getattr(self, "label", "error")
        for line in self.lines:
            print(f"{label}: {one_line(line)}", file=stream)
        stream.flush()


def report_failure(exc: BaseException, stream: TextIO | None = None) -> int | None:
    """Print what stopped a command as the command line does, one line, and return its exit
    status: a :class:`ContsupError`'s lines and code, Ctrl-C outside a step (130), an operating
    system refusal such as a full disk (1, naming the file), a folder where a file belongs, a
    path that does not exist or a FIFO where a file belongs (2).
    None for anything else: a bug,
    whose traceback should be seen."""
    stream = stream or sys.stderr
    if isinstance(exc, ContsupError):
        exc.print(stream)
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted", file=stream, flush=True)
        return 130
    if isinstance(exc, OSError) and exc.errno == errno.EISDIR and exc.filename:
        # a folder where a run's file belongs (metrics.jsonl, model.pt): the user's to move
        print(f"error: {exc.filename} is a directory where a file belongs; move it out of the way "
              f"and run the command again", file=stream, flush=True)
        return 2
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {one_line(where + (exc.strerror or str(exc)))}", file=stream, flush=True)
        # a path that names nothing usable (missing, below a file, a FIFO) is the user's input
        return getattr(exc, "exit_code", None) or (2 if exc.errno in BAD_PATH else 1)
    return None


# what the operating system answers for a path that cannot be used as given: bad input, exit 2
BAD_PATH = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.ENXIO})


class BatchError(ContsupError):
    """A local loss that cannot be computed on one particular batch (a contrastive loss on a batch
    in which no two samples share a label). Training stops with the module, epoch and step named."""


class UnreadableData(ContsupError):
    """A data file that cannot be read once a run is under way, raised by a dataset's items (an
    image that does not decode). The training loop stops on it as a training failure (exit
    status 1) with a checkpoint to resume from once the file is replaced; the line names the file."""

    exit_code = 1

    def __init__(self, *lines: str) -> None:
        if len(lines) == 1 and "Traceback" in lines[0]:
            # a DataLoader worker re-raises it as UnreadableData(its traceback): keep the original line
            last = [line for line in lines[0].splitlines() if line.strip()][-1]
            prefix = f"{type(self).__module__}.{type(self).__name__}: "
            lines = (last[len(prefix):] if last.startswith(prefix) else last,)
        super().__init__(*lines)


class RecipeError(ContsupError):
    """Every problem found in a recipe, collected so the user sees them all at once."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__(*self.problems)


class PluginError(ContsupError):
    """A plugin broke the registry contract (duplicate name, missing attribute)."""

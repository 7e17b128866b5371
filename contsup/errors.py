"""Errors a user can fix: printed as one line per problem, exit status 2, never a traceback."""

from __future__ import annotations

from typing import Iterable


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


class ContsupError(Exception):
    """A problem with the user's input; ``lines`` are printed as they are."""

    exit_code = 2

    def __init__(self, *lines: str) -> None:
        self.lines = tuple(lines)
        super().__init__("\n".join(self.lines))


class BatchError(ContsupError):
    """A local loss that cannot be computed on one particular batch (a contrastive loss on a batch
    in which no two samples share a label). Training stops with the module, epoch and step named."""


class RecipeError(ContsupError):
    """Every problem found in a recipe, collected so the user sees them all at once."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__(*self.problems)


class PluginError(ContsupError):
    """A plugin broke the registry contract (duplicate name, missing attribute)."""

"""Closest-first suggestions for misspelt names, as error messages show them."""

from __future__ import annotations

import difflib
from typing import Iterable


def closest_first(name: str, choices: Iterable[str]) -> list[str]:
    """``choices`` sorted by similarity to ``name`` (most similar first, ties alphabetical)."""
    lowered = name.lower()

    def score(choice: str) -> float:
        return difflib.SequenceMatcher(None, lowered, choice.lower()).ratio()

    return sorted(set(choices), key=lambda c: (-score(c), c))


def did_you_mean(name: str, choices: Iterable[str], limit: int = 8) -> str:
    """A phrase like ``"did you mean 'resnet18'? choices: resnet18, resnet34, ..."``."""
    ordered = closest_first(name, choices)
    if not ordered:
        return "nothing is available"
    close = difflib.SequenceMatcher(None, name.lower(), ordered[0].lower()).ratio() >= 0.5
    shown = ", ".join(ordered[:limit])
    more = f", ... ({len(ordered) - limit} more)" if len(ordered) > limit else ""
    hint = f"did you mean '{ordered[0]}'? " if close else ""
    return f"{hint}choices: {shown}{more}"

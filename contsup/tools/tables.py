"""Plain-text tables for the command line: columns padded to their widest cell, a rule under the header."""

from __future__ import annotations

from typing import Sequence


def format_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_shape(shape: Sequence[int]) -> str:
    """64x8x8 for a feature map (C, H, W); 197x384 tokens for a token sequence (N, D)."""
    return "x".join(str(d) for d in shape) + (" tokens" if len(shape) == 2 else "")


__all__ = ["format_table", "format_shape"]

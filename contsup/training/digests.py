"""Digested files: a SHA-256 and size written beside a file (``NAME.sha256``) and checked before
its bytes are used, so a truncated, extended or changed file is refused with a line saying how
(the writing side is :func:`contsup.training.rundir.save_digested`)."""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path
from typing import Any

import torch

from contsup.core.files import SMALL_LIMIT, read_text


class DamagedFile(Exception):
    """A file whose digest says it changed after writing; the message says how."""


def sidecar(path: Path) -> Path:
    """The digest file beside ``path``: ``NAME.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


REFUSED_PICKLE = "it holds pickled objects other than tensors, refused unread (loading them could run code)"


def load_tensors(raw: bytes, map_location: str = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of a file's bytes. A pickle that names anything beyond
    tensors and plain containers (code to run, as in a malicious file) is refused unread as
    :class:`DamagedFile` saying so: torch's own message advises loading it with
    ``weights_only=False``, which would run that code."""
    try:
        return torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise DamagedFile(REFUSED_PICKLE) from None


def digest_record(path: Path) -> tuple[str, int] | None:
    """The SHA-256 and size recorded beside ``path`` (None: no digest file); raises
    :class:`DamagedFile` when the digest file is damaged or not a file."""
    digest = sidecar(path)
    if not (digest.exists() or digest.is_symlink()):
        return None
    try:
        expected, size = read_text(digest, SMALL_LIMIT, "a digest file").split()
        return expected, int(size)
    except (OSError, UnicodeDecodeError, ValueError):
        raise DamagedFile(f"its digest file {digest.name} is damaged") from None


def check_size(path: Path, size: int) -> None:
    """Before reading ``path`` (``size`` bytes): :class:`DamagedFile` when its digest recorded
    another size, so a truncated or a huge file is refused unread."""
    record = digest_record(path)
    if record is not None and record[1] != size:
        raise DamagedFile(f"truncated or extended: {size} bytes, {record[1]} were written")


def check_digest(path: Path, raw: bytes) -> bool:
    """Whether ``raw`` (the bytes of ``path``) was verified against its digest: False when the
    digest file is missing; raises :class:`DamagedFile` when it does not match."""
    record = digest_record(path)
    if record is None:
        return False
    expected, size = record
    if len(raw) != int(size):
        raise DamagedFile(f"truncated or extended: {len(raw)} bytes, {size} were written")
    if hashlib.sha256(raw).hexdigest() != expected:
        raise DamagedFile("its contents changed after writing (SHA-256 mismatch)")
    return True


__all__ = ["DamagedFile", "REFUSED_PICKLE", "sidecar", "load_tensors", "digest_record", "check_size", "check_digest"]

"""Checkpoint files: written atomically with a SHA-256 beside them, the last two kept, read with
``torch.load(weights_only=True)``, and a damaged latest one skipped for the one before it.

A checkpoint holds only tensors and plain containers (no pickled objects): the model, every
optimizer, scheduler and grad scaler, the RNG states, the data order, the position in the run,
the metrics so far and the resolved recipe. ``Trainer.checkpoint_state`` builds it.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from contsup.errors import ContsupError, reason
from contsup.core.files import file_size, read_file
from contsup.training.rundir import DamagedFile, check_digest, check_size, load_tensors, save_digested, sidecar

CHECKPOINT_DIR = "checkpoints"
FORMAT = 1
KEEP = 2
NAME = re.compile(r"^step-(\d{9})\.pt$")
PARTIAL = re.compile(r"^\.step-\d{9}\.pt.*\.tmp$")  # what a writer killed mid-write leaves behind


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be used; the message says why."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}.pt"


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first (by optimizer step)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


# -- RNG states as plain tensors and containers ----------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and (if present) every CUDA device's RNG state."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where the devices exist)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# -- writing -------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, state: dict[str, Any], keep: int = KEEP) -> Path:
    """Write ``state`` as ``checkpoints/step-NNNNNNNNN.pt`` (atomically, its digest written just
    before it takes its name), then delete all but the newest ``keep`` checkpoints and any digest
    left without its checkpoint (by a kill while pruning)."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / checkpoint_name(int(state["global_step"]))
    save_digested(path, state)
    for old in checkpoint_paths(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
        _sidecar(old).unlink(missing_ok=True)
    _remove_orphan_digests(folder)
    return path


def _sidecar(path: Path) -> Path:
    return sidecar(path)


def _remove_orphan_digests(folder: Path) -> None:
    """Digest files whose checkpoint is gone (a kill between deleting the two)."""
    for digest in folder.iterdir() if folder.is_dir() else ():
        if digest.name.endswith(".pt.sha256") and NAME.match(digest.name[: -len(".sha256")]):
            if not digest.with_name(digest.name[: -len(".sha256")]).exists():
                digest.unlink(missing_ok=True)


# -- reading -------------------------------------------------------------------------------

_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format": int, "recipe": dict, "epoch": int, "batch": int, "global_step": int, "steps_per_epoch": int,
    "model": dict, "optimizers": list, "schedulers": list, "scalers": list, "rng": dict,
    "data_generator": torch.Tensor, "history": list,
}


def read_checkpoint(path: Path, warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load and check one checkpoint; raises CorruptCheckpoint saying what is wrong. One without
    its digest file (every checkpoint is written with one) is checked by its structure only, and
    ``warn`` says that it could not be verified."""
    path = Path(path)
    try:
        check_size(path, file_size(path))  # a truncated or huge file is refused unread
        raw = read_file(path, None)
    except OSError as exc:
        raise CorruptCheckpoint(f"cannot be read ({exc.strerror or exc})") from None
    except DamagedFile as exc:
        raise CorruptCheckpoint(str(exc)) from None
    except MemoryError:
        raise CorruptCheckpoint("cannot be read (more than this process can hold in memory)") from None
    try:
        verified = check_digest(path, raw)
    except DamagedFile as exc:
        raise CorruptCheckpoint(str(exc)) from None
    try:
        state = load_tensors(raw)
    except DamagedFile as exc:
        raise CorruptCheckpoint(str(exc)) from None
    except Exception as exc:  # torch raises many kinds for damaged files
        raise CorruptCheckpoint(f"not a readable checkpoint ({type(exc).__name__}: {reason(exc, 200)})") from None
    _check_structure(state)
    if not verified and warn is not None:
        warn(
            f"checkpoint {path} could not be verified: its digest file {_sidecar(path).name} is missing "
            f"(only its structure was checked)"
        )
    return state


def _check_structure(state: Any) -> None:
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"holds a {type(state).__name__}, not a checkpoint")
    for key, kind in _REQUIRED.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise CorruptCheckpoint(f"its '{key}' entry is missing or malformed")
    if state["format"] != FORMAT:
        raise CorruptCheckpoint(f"format {state['format']} is not the format {FORMAT} this contsup reads")
    if (state["epoch"] != len(state["history"]) + 1 or not 0 <= state["batch"] <= state["steps_per_epoch"]
            or state["global_step"] < 0 or state["steps_per_epoch"] < 1):
        raise CorruptCheckpoint("its position (epoch, batch, step) does not agree with its metrics history")
    if not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise CorruptCheckpoint("its model entry holds something other than tensors")
    if not all(isinstance(m, dict) for m in state["history"]):
        raise CorruptCheckpoint("its metrics history is malformed")
    if state.get("partial") is not None and not isinstance(state["partial"], dict):
        raise CorruptCheckpoint("its partial-epoch entry is malformed")
    rng = state["rng"]
    if not (isinstance(rng.get("python"), (tuple, list)) and isinstance(rng.get("numpy"), dict) and isinstance(rng.get("torch"), torch.Tensor)):
        raise CorruptCheckpoint("its RNG state is malformed")


def describe(state: dict[str, Any]) -> str:
    """Where a checkpoint stands, in words: ``end of epoch 2`` or ``epoch 3, after step 5 of 20``."""
    epoch, batch, n = state["epoch"], state["batch"], state["steps_per_epoch"]
    if batch == 0:
        return f"end of epoch {epoch - 1}" if epoch > 1 else "start of training"
    return f"epoch {epoch}, after step {batch} of {n}"


def load_latest(
    run_dir: Path, warn: Callable[[str], None], tidy: bool = True,
) -> tuple[dict[str, Any], Path] | None:
    """The newest usable checkpoint and its path; each damaged newer one is reported through
    ``warn`` and renamed ``*.corrupt`` (kept for inspection, never loaded again). With ``tidy``
    (the caller holds the run directory's lock: a resume) temporary files of a killed write and
    digests left without their checkpoint are removed; a reader that does not hold it (``contsup
    eval`` of a run that may be training) leaves them, as they may be a write in progress. None if
    the run has no checkpoint; an error naming every damaged one if none is usable."""
    folder = checkpoint_dir(run_dir)
    if tidy:
        for leftover in folder.iterdir() if folder.is_dir() else ():
            if PARTIAL.match(leftover.name):
                leftover.unlink(missing_ok=True)
        _remove_orphan_digests(folder)
    problems = []
    for odd in sorted(folder.iterdir()) if folder.is_dir() else ():
        if NAME.match(odd.name) and not odd.is_file():  # a checkpoint's name on a folder or the like
            problems.append((odd, "it is not a file"))
    paths = checkpoint_paths(run_dir)
    if not paths and not problems:
        return None
    unverified: list[tuple[Path, dict[str, Any], str]] = []
    for path in reversed(paths):
        notes: list[str] = []
        try:
            state = read_checkpoint(path, notes.append)
        except CorruptCheckpoint as exc:
            problems.append((path, str(exc)))
            continue
        if notes:  # its digest is missing: not trusted while an older one verifies
            unverified.append((path, state, notes[0]))
            continue
        _report_skipped(problems, unverified, path, warn, tidy)
        return state, path
    if unverified:  # none verifies (a run written before checkpoints had digests): the newest
        path, state, note = unverified[0]
        warn(note)
        _report_skipped(problems, [], path, warn, tidy)
        return state, path
    lines = [f"checkpoint {bad} is damaged: {why}" for bad, why in problems]
    raise ContsupError(*lines, f"{run_dir}: none of its checkpoints is usable; start the run again with --new")


def _report_skipped(
    problems: list[tuple[Path, str]], unverified: list[tuple[Path, dict[str, Any], str]], used: Path,
    warn: Callable[[str], None], tidy: bool,
) -> None:
    """Warn of each checkpoint passed over for ``used``; set each damaged one aside as
    ``*.corrupt`` (never loaded again, and no later write meets it), and, with ``tidy`` (the
    caller holds the lock), each unverified one too."""
    for bad, why in problems:
        warn(f"checkpoint {bad} is damaged: {why}; using the one before it")
        _set_aside(bad)
    for bad, _, note in unverified:
        warn(f"{note}: not trusted while {used.name}, an older one, verifies; using that one")
        if tidy:
            _set_aside(bad)


def _set_aside(path: Path) -> None:
    try:
        path.rename(path.with_name(path.name + ".corrupt"))
        _sidecar(path).unlink(missing_ok=True)
    except OSError:
        pass

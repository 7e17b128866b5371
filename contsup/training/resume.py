"""Resuming a run: find its newest usable checkpoint, check that the recipe has not changed,
and bring metrics.jsonl back in line with what the checkpoint holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import attrs

from contsup.training.checkpoint import checkpoint_dir, checkpoint_paths, describe, load_latest
from contsup.errors import ContsupError
from contsup.config.early_stop import stop_reason
from contsup.config.recipe import Recipe, load_recipe
from contsup.config.schema import SECTIONS
from contsup.core.registry import Registries
from contsup.training.lock import RunLock
from contsup.training.rundir import (
    METRICS_FILE, MODEL_FILE, RECIPE_FILE, UnusableModel, read_metrics, read_model_file, refused_writes,
    remove_partial_writes, write_metrics, write_recipe, write_recipe_table,
)
from contsup.options import as_table

# Keys that do not change what is computed: they may differ on resume without --force.
FREE_KEYS = (
    "run.out_dir", "run.log_every", "log.",
    # how the ranks are laid out and wait for each other: the same updates either way
    "distributed.stages", "distributed.max_in_flight", "distributed.timeout_s", "distributed.backend",
)


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 0.1}}`` -> ``{"optimizer.lr": 0.1}``."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _section_defaults() -> dict[str, Any]:
    """``section.key`` -> default, for the sections' own keys (``run.seed``, ``distributed.mode``)."""
    return {f"{s.name}.{k}": v for s in SECTIONS for k, v in as_table(s.own()).items()}


def recipe_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``key (old -> new)`` for every key whose value differs, except :data:`FREE_KEYS`. A
    section key the saved recipe lacks (it was written before the key existed) counts as its default."""
    a, b = flatten(saved), flatten(now)
    defaults = _section_defaults()
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == f or (f.endswith(".") and key.startswith(f)) for f in FREE_KEYS):
            continue
        old, new = a.get(key, defaults.get(key, "(absent)")), b.get(key, "(absent)")
        if old != new:
            out.append(f"{key} ({old!r} -> {new!r})")
    return out


@attrs.frozen
class Resumption:
    """What ``contsup train --resume`` continues: the recipe, and the checkpoint (None: from the
    start); ``lock``: the run directory's lock, held from here until the run ends."""

    run_dir: Path
    recipe: Recipe
    state: dict | None
    checkpoint: Path | None
    lock: RunLock | None = None

    def where(self) -> str:
        if self.state is None:
            return "the beginning (the run stopped before its first checkpoint)"
        return f"{self.checkpoint} ({describe(self.state)})"


def prepare_resume(
    run_dir: Path,
    recipe_path: str | None,
    overrides: Sequence[str],
    registries: Registries,
    force: bool,
    warn: Callable[[str], None],
) -> Resumption:
    """Check that ``run_dir`` can be resumed with this recipe; refuses a changed recipe unless
    ``force``. Takes the run directory's lock first (another process training into it is refused)
    and hands it on in the result; on a refusal it is released again."""
    run_dir = Path(run_dir)
    saved_recipe = run_dir / RECIPE_FILE
    if not run_dir.is_dir():
        raise ContsupError(f"--resume {run_dir}: no such run directory")
    if not saved_recipe.exists() and not checkpoint_paths(run_dir):
        raise ContsupError(f"--resume {run_dir}: not a run directory (it has no {RECIPE_FILE})")
    lock = RunLock.take(run_dir, warn)
    try:
        return attrs.evolve(_prepare_locked(run_dir, recipe_path, overrides, registries, force, warn), lock=lock)
    except BaseException:
        lock.release()
        raise


def _prepare_locked(
    run_dir: Path, recipe_path: str | None, overrides: Sequence[str], registries: Registries, force: bool,
    warn: Callable[[str], None],
) -> Resumption:
    saved_recipe = run_dir / RECIPE_FILE
    folder = checkpoint_dir(run_dir)
    if folder.exists() and not folder.is_dir():
        raise ContsupError(
            f"--resume {run_dir}: {folder} is not a directory, so the run's checkpoints are not there; "
            f"put them back (nothing was changed)"
        )
    remove_partial_writes(run_dir)
    found = load_latest(run_dir, warn)
    state, checkpoint = found if found is not None else (None, None)
    if not saved_recipe.exists():  # every checkpoint holds the resolved recipe
        with refused_writes(run_dir, lambda: f"its checkpoint {checkpoint} is kept"):
            write_recipe_table(run_dir, state["recipe"], f"{checkpoint}, as {RECIPE_FILE} was missing")
        warn(f"{saved_recipe} was missing; restored it from the recipe in {checkpoint}")
    if state is None:
        _nothing_to_lose(run_dir, warn)
    recipe = load_recipe(recipe_path or saved_recipe, overrides, registries)
    if state is not None:
        before = state["recipe"]
    else:
        before = load_recipe(saved_recipe, (), registries).table()
    changed = recipe_differences(before, recipe.table())
    if changed and not force:
        raise ContsupError(
            f"--resume {run_dir}: the recipe differs from the run's in {', '.join(changed)}; "
            f"resume with the run's own recipe, or pass --force to continue with the new values"
        )
    done = len(state["history"]) if state is not None else 0
    early = stop_reason(recipe.run.early_stop, state["history"]) if state is not None else None
    if (done >= recipe.run.epochs or early) and (run_dir / MODEL_FILE).exists():
        try:
            read_model_file(run_dir / MODEL_FILE, warn=lambda _line: None)
        except UnusableModel as exc:  # the resume writes it again from the final checkpoint
            warn(f"{run_dir / MODEL_FILE} cannot be used ({exc.why}); writing it again from {checkpoint}")
        else:
            if early and done < recipe.run.epochs:
                raise ContsupError(
                    f"--resume {run_dir}: the run stopped early after epoch {done} ({early}), so it is finished; to train "
                    f"on, change or remove run.early_stop (--set 'run.early_stop={{}}') and pass --force"
                )
            raise ContsupError(
                f"--resume {run_dir}: the run already finished its {done} epochs; to train on, raise "
                f"run.epochs (--set run.epochs={done + 1}) and pass --force"
            )
    kept = f"its checkpoint {checkpoint} is kept" if checkpoint is not None else "nothing was trained yet"
    with refused_writes(run_dir, lambda: f"{kept} and nothing in the run directory changed"):
        if changed:
            warn(f"resuming with a changed recipe (--force): {', '.join(changed)}")
            write_recipe(run_dir, recipe)
        write_metrics(run_dir, state["history"] if state is not None else [])
    return Resumption(run_dir, recipe, state, checkpoint)


def _nothing_to_lose(run_dir: Path, warn: Callable[[str], None]) -> None:
    """A run without checkpoints starts again from the beginning, rewriting model.pt and
    metrics.jsonl: refused when they hold finished work (the checkpoints were deleted)."""
    epochs = read_metrics(run_dir, warn)
    folder = checkpoint_dir(run_dir)
    if (run_dir / MODEL_FILE).exists():
        done = f" ({len(epochs)} epochs in {METRICS_FILE})" if epochs else ""
        raise ContsupError(
            f"--resume {run_dir}: the run finished{done} and has its {MODEL_FILE}, but no checkpoint is left in "
            f"{folder}; it cannot be trained on, and it is not retrained over its results: start a new run with --new"
        )
    if epochs:
        raise ContsupError(
            f"--resume {run_dir}: {METRICS_FILE} records {len(epochs)} finished epoch(s) but no checkpoint is left in "
            f"{folder} to continue from; resuming would retrain from the beginning and drop them: put the checkpoints "
            f"back, or start a new run with --new"
        )

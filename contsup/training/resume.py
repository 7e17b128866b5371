"""Resuming a run: find its newest usable checkpoint, check that the recipe has not changed,
and bring metrics.jsonl back in line with what the checkpoint holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import attrs

from contsup.training.checkpoint import describe, load_latest
from contsup.errors import ContsupError
from contsup.config.recipe import Recipe, SECTIONS, load_recipe
from contsup.core.registry import Registries
from contsup.training.rundir import MODEL_FILE, RECIPE_FILE, write_metrics, write_recipe
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
    """What ``contsup train --resume`` continues: the recipe, and the checkpoint (None: from the start)."""

    run_dir: Path
    recipe: Recipe
    state: dict | None
    checkpoint: Path | None

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
    """Check that ``run_dir`` can be resumed with this recipe; refuses a changed recipe unless ``force``."""
    run_dir = Path(run_dir)
    saved_recipe = run_dir / RECIPE_FILE
    if not run_dir.is_dir():
        raise ContsupError(f"--resume {run_dir}: no such run directory")
    if not saved_recipe.exists():
        raise ContsupError(f"--resume {run_dir}: not a run directory (it has no {RECIPE_FILE})")
    found = load_latest(run_dir, warn)
    state, checkpoint = found if found is not None else (None, None)
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
    if done >= recipe.run.epochs and (run_dir / MODEL_FILE).exists():
        raise ContsupError(
            f"--resume {run_dir}: the run already finished its {done} epochs; to train on, raise "
            f"run.epochs (--set run.epochs={done + 1}) and pass --force"
        )
    if changed:
        warn(f"resuming with a changed recipe (--force): {', '.join(changed)}")
        write_recipe(run_dir, recipe)
    write_metrics(run_dir, state["history"] if state is not None else [])
    return Resumption(run_dir, recipe, state, checkpoint)

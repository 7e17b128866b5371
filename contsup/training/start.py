"""Starting a run: from a recipe (a file, or one already loaded) or from a run directory to
resume, to the run directory with its recipe and plugin versions, before anything trains.

The one place where a run starts, for one process (:func:`contsup.api.train`) and for rank 0
of a distributed run (:mod:`contsup.distributed.launch`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import attrs

from contsup.config.reading import apply_overrides
from contsup.config.recipe import Recipe, load_recipe
from contsup.config.validation import build_recipe
from contsup.core.registry import Registries
from contsup.core.version import __version__
from contsup.errors import ContsupError, RecipeError, one_line
from contsup.training.lock import RunLock
from contsup.training.resume import prepare_resume
from contsup.training.rundir import (
    create_run_dir, default_run_dir, discard_unstarted, refused_writes, write_recipe, write_versions,
)


@attrs.frozen
class Request:
    """What a caller asks for: a recipe (path or loaded) with overrides and an optional run
    directory, or a run directory to resume (``resume``; ``recipe`` then optionally replaces the
    run's own, which ``force`` allows to differ). ``new`` picks a fresh ``NAME-N`` directory."""

    recipe: str | Path | Recipe | None = None
    overrides: tuple[str, ...] = ()
    out_dir: str | Path | None = None
    resume: str | Path | None = None
    new: bool = False
    force: bool = False


@attrs.frozen
class Prepared:
    """A checked recipe and, when resuming, the run directory, its checkpoint state (None: it
    stopped before its first checkpoint), where it stands and its lock (held by this process:
    the caller releases it, with :meth:`release`, when the run ends or does not start)."""

    recipe: Recipe
    resume_dir: Path | None = None
    state: dict | None = None
    where: str = ""
    lock: RunLock | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


@attrs.frozen
class Started:
    """A run directory ready to train into: the recipe, the directory, the checkpoint to load and
    the directory's lock (on the process that writes the run; released with :meth:`release`)."""

    recipe: Recipe
    run_dir: Path
    state: dict | None
    resumed: bool
    lock: RunLock | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def _overrides(request: Request) -> tuple[str, ...]:
    if request.out_dir is None:
        return tuple(request.overrides)
    return (*request.overrides, f"run.out_dir={json.dumps(str(request.out_dir))}")


def prepare(request: Request, registries: Registries, warn: Callable[[str], None]) -> Prepared:
    """Check the request and load its recipe; nothing is written yet, except what resuming a
    changed recipe with ``force`` records."""
    if request.resume is not None:
        if request.new:
            raise ContsupError("contsup train: --new and --resume exclude each other")
        if isinstance(request.recipe, Recipe):
            raise ContsupError("contsup train: with --resume, give the recipe as a file path (or none: the run's own)")
        recipe_path = None if request.recipe is None else str(request.recipe)
        run = prepare_resume(Path(request.resume), recipe_path, _overrides(request), registries, request.force, warn)
        return Prepared(run.recipe, run.run_dir, run.state, run.where(), run.lock)
    if request.force:
        raise ContsupError("contsup train: --force only applies with --resume RUN_DIR")
    if request.recipe is None:
        raise ContsupError("contsup train: give a recipe file, or --resume RUN_DIR to continue a run")
    return Prepared(recipe_from(request.recipe, _overrides(request), registries))


def recipe_from(recipe: str | Path | Recipe, overrides: Sequence[str], registries: Registries) -> Recipe:
    """A recipe file read and checked, or a loaded recipe with ``overrides`` applied and checked again."""
    if not isinstance(recipe, Recipe):
        return load_recipe(recipe, overrides, registries)
    if not overrides:
        return recipe
    data, keys, problems = apply_overrides(_fresh_components(recipe.table(), overrides), overrides)
    try:
        changed = build_recipe(data, recipe.source, registries, keys)
    except RecipeError as exc:
        raise RecipeError([*problems, *exc.problems]) from None
    if problems:
        raise RecipeError(problems)
    return changed


def _fresh_components(table: dict, overrides: Sequence[str]) -> dict:
    """A loaded recipe's table holds every option of every component; an override that names
    another component (``context.use=...``) starts that table afresh, as a recipe file that
    names only ``use`` would, so the old component's options do not stick to the new one."""
    for text in overrides:
        key, _, value = text.partition("=")
        path = key.strip().split(".")
        if path[-1] != "use" or len(path) < 2:
            continue
        node: Any = table
        for part in path[:-1]:
            node = node[int(part)] if isinstance(node, list) and part.isdigit() and int(part) < len(node) else (
                node.get(part) if isinstance(node, dict) else None)
            if node is None:
                break
        if isinstance(node, dict) and str(node.get("use")) != value.strip().strip('"').strip("'"):
            for name in [k for k in node if k != "use"]:
                del node[name]
    return table


def open_run(
    prepared: Prepared, pm: Any, new: bool = False, on: str = "", warn: Callable[[str], None] | None = None,
) -> Started:
    """Make the run directory and lock it (or reopen the one to resume, which ``prepare``
    locked) and say so in one line; ``on`` describes the processes (" on 2 processes (pipeline
    parallel)"). The lock travels on in the result."""
    recipe = prepared.recipe
    if prepared.resume_dir is not None:
        print(f"contsup {__version__}: resuming {prepared.resume_dir} from {prepared.where}{on}", flush=True)
        return Started(recipe, prepared.resume_dir, prepared.state, True, prepared.lock)
    run_dir = create_run_dir(default_run_dir(recipe), new=new)
    lock = RunLock.take(run_dir, warn or _print_warning)
    try:
        with refused_writes(run_dir, lambda: "nothing was trained yet and the half-made run directory was removed",
                            "once {when}, the same command starts the run"):
            write_recipe(run_dir, recipe)
            write_versions(run_dir, recipe, pm)
    except BaseException:
        lock.release()
        discard_unstarted(run_dir)  # so the same command works once the problem is fixed
        raise
    print(f"contsup {__version__}: training {recipe.source} into {run_dir}{on}", flush=True)
    return Started(recipe, run_dir, None, False, lock)


def _print_warning(line: str) -> None:
    print(f"warning: {one_line(line)}", file=sys.stderr, flush=True)


__all__ = ["Request", "Prepared", "Started", "prepare", "recipe_from", "open_run"]

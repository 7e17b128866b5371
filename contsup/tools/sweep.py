"""Sweeps: one base recipe (or several) crossed with axes of values, each combination trained
into its own run directory; finished runs are skipped when the sweep is run again.

A sweep file::

    # contsup sweep recipes/sweeps/digits.sweep.toml
    [sweep]
    recipes = ["../digits.toml"]       # relative to this file; several recipes are one more axis
    out_dir = "runs/sweeps/digits"     # default runs/<sweep name>

    [axes]                             # key path -> values; every combination runs
    "partition.modules" = [4, 16]
    "context.use" = ["none", "R1E"]
    "run.seed" = [0, 1, 2]
"""

from __future__ import annotations

import itertools
import os
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

import attrs

from contsup import api
from contsup.core import tomlw
from contsup.errors import ContsupError, RecipeError, report_failure
from contsup.config.reading import is_recipe, is_sweep, load_with_extends, read_toml, set_path
from contsup.config.validation import build_recipe
from contsup.core.registry import Registries
from contsup.suggest import did_you_mean

SWEEP_KEYS = ("recipe", "recipes", "out_dir")
SWEEP_TABLES = ("sweep", "axes")


FINISHED_MARKER = "model.pt"


@attrs.frozen
class Run:
    """One combination: a base recipe, the axis values it sets, and its run directory."""

    recipe: Path
    settings: tuple[tuple[str, Any], ...]
    run_dir: Path

    def overrides(self) -> list[str]:
        """``--set`` arguments reproducing this combination (values as TOML literals)."""
        out = [f"{key}={_literal(value)}" for key, value in self.settings]
        return out + [f"run.out_dir={_literal(str(self.run_dir))}"]

    def command(self) -> str:
        """The shell command that trains this run on its own."""
        parts = ["contsup", "train", str(self.recipe)]
        for o in self.overrides():
            parts += ["--set", o]
        return " ".join(shlex.quote(p) for p in parts)

    @property
    def finished(self) -> bool:
        return (self.run_dir / FINISHED_MARKER).exists()

    @property
    def started(self) -> bool:
        return self.run_dir.exists() and any(self.run_dir.iterdir())


def _literal(value: Any) -> str:
    return tomlw.value_literal(value)


def _flatten_axes(table: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out += _flatten_axes(value, f"{path}.")
        else:
            out.append((path, value))
    return out


def _dir_part(key: str, value: Any) -> str:
    shown = value if isinstance(value, str) else (json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else _literal(value))
    return re.sub(r"[^A-Za-z0-9._=+,-]", "-", f"{key}={shown}")


@attrs.frozen
class Sweep:
    """A parsed sweep file."""

    source: Path
    recipes: tuple[Path, ...]
    axes: tuple[tuple[str, tuple[Any, ...]], ...]
    out_dir: Path

    def runs(self) -> list[Run]:
        """Every combination, in file order (the last axis varies fastest)."""
        keys = [k for k, _ in self.axes]
        out = []
        for recipe in self.recipes:
            for values in itertools.product(*(v for _, v in self.axes)):
                settings = tuple(zip(keys, values))
                name = "__".join(_dir_part(k, v) for k, v in settings) or "base"
                out.append(Run(recipe, settings, self.out_dir / recipe.stem / name))
        return out


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; problems are reported together, one line each."""
    path = Path(path)
    data = read_toml(path)
    where = str(path)
    if not is_sweep(data) and is_recipe(data):
        raise RecipeError([
            f"{where}: a recipe, not a sweep file (a sweep has [sweep] recipes = [...] and [axes]); "
            f"train it with: contsup train {where}"
        ])
    problems = []
    for key in data:
        if key not in SWEEP_TABLES:
            problems.append(f"{where}: {key}: unknown table; {did_you_mean(key, SWEEP_TABLES)}")
    head = data.get("sweep", {})
    if not isinstance(head, Mapping):
        head = {}
        problems.append(f"{where}: sweep: expected a [sweep] table")
    for key in head:
        if key not in SWEEP_KEYS:
            problems.append(f"{where}: sweep.{key}: unknown key; {did_you_mean(key, SWEEP_KEYS)}")
    names = head.get("recipes", [head["recipe"]] if "recipe" in head else None)
    if not names or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        problems.append(f"{where}: sweep.recipes: expected a list of recipe files (or recipe = \"file.toml\")")
        names = []
    recipes = []
    for name in names:
        recipe = Path(os.path.normpath(path.parent / name))
        if not recipe.is_file():
            problems.append(f"{where}: sweep.recipes: no such recipe file {recipe}")
        recipes.append(recipe)
    out_dir = head.get("out_dir", str(Path("runs") / path.name.split(".")[0]))
    if not isinstance(out_dir, str):
        problems.append(f"{where}: sweep.out_dir: expected a string")
        out_dir = "runs"
    axes_table = data.get("axes", {})
    if not isinstance(axes_table, Mapping):
        problems.append(f"{where}: axes: expected an [axes] table of key path = [values]")
        axes_table = {}
    axes = []
    for key, values in _flatten_axes(axes_table):
        if key == "run.out_dir":
            problems.append(f"{where}: axes.{key}: the sweep chooses each run's directory; set sweep.out_dir instead")
        elif not isinstance(values, list) or not values:
            problems.append(f"{where}: axes.\"{key}\": expected a non-empty list of values")
        else:
            axes.append((key, tuple(values)))
    if problems:
        raise RecipeError(problems)
    return Sweep(path, tuple(recipes), tuple(axes), Path(out_dir))


def check_runs(sweep: Sweep, registries: Registries) -> list[str]:
    """Validate every combination before anything runs: one line per distinct problem, naming
    the combinations that have it (by their axis values where those describe them exactly)."""
    found: dict[str, list[Run]] = {}
    bases = {recipe: load_with_extends(recipe) for recipe in sweep.recipes}
    runs = sweep.runs()
    for run in runs:
        data = json.loads(json.dumps(bases[run.recipe]))
        problems = [p for key, value in run.settings if (p := set_path(data, key.split("."), value))]
        try:
            build_recipe(data, str(run.recipe), registries)
        except RecipeError as exc:
            problems += exc.problems
        for problem in dict.fromkeys(problems):
            found.setdefault(problem, []).append(run)
    return [f"{sweep.source}: [{describe_runs(sweep, has)}] {problem}" for problem, has in found.items()]


def _axis_values(sweep: Sweep, run: Run) -> list[tuple[str, str]]:
    """(axis, value as written) for every axis of ``run``; the recipe is one when there are several."""
    recipe = [("recipe", run.recipe.name)] if len(sweep.recipes) > 1 else []
    return recipe + [(key, _literal(value)) for key, value in run.settings]


def describe_runs(sweep: Sweep, subset: Sequence[Run]) -> str:
    """Which of the sweep's combinations ``subset`` holds: "all N combinations", the axis values
    that select exactly it (``partition.modules=40``, ``context.use in ["E", "R1X"]``), or else
    each combination's values."""
    runs = sweep.runs()
    if len(subset) == len(runs):
        return f"all {len(runs)} combinations" if len(runs) > 1 else "the only combination"
    every = [_axis_values(sweep, r) for r in runs]
    chosen = [_axis_values(sweep, r) for r in subset]
    parts, size = [], 1
    for i, (key, _) in enumerate(every[0]):
        values = list(dict.fromkeys(v[i][1] for v in chosen))
        size *= len(values)
        if len(values) < len(dict.fromkeys(v[i][1] for v in every)):
            parts.append(f"{key}={values[0]}" if len(values) == 1 else f"{key} in [{', '.join(values)}]")
    if size == len(subset) == len({tuple(c) for c in chosen}):  # the subset is exactly that product
        return " ".join(parts)
    return "; ".join(" ".join(f"{k}={v}" for k, v in c) for c in chosen)


def run_sweep(sweep: Sweep, dry_run: bool = False, out: TextIO | None = None) -> int:
    """Train every unfinished combination in turn (or print the commands); 0 when all finished.
    A started but unfinished run resumes from its last checkpoint; Ctrl-C stops the sweep."""
    out = out or sys.stdout
    runs = sweep.runs()
    todo = [r for r in runs if not r.finished]
    print(f"sweep {sweep.source}: {len(runs)} runs, {len(runs) - len(todo)} already finished", file=sys.stderr)
    if dry_run:
        for run in todo:
            print(run.command(), file=out)
        return 0
    failed = []
    for i, run in enumerate(todo, start=1):
        if run.started:
            print(f"[{i}/{len(todo)}] resuming {run.run_dir}", file=out, flush=True)
        else:
            print(f"[{i}/{len(todo)}] {run.command()}", file=out, flush=True)
        code = _train(run)
        if code in (129, 130, 143):  # SIGHUP, Ctrl-C or SIGTERM: the run saved a checkpoint; stop the whole sweep
            print(f"sweep stopped; run it again to resume {run.run_dir} and go on", file=out, flush=True)
            return code
        if code != 0:
            failed.append((run, code))
    finished = sum(r.finished for r in runs)
    print(f"sweep {sweep.source}: {finished}/{len(runs)} runs finished, {len(failed)} failed", file=out)
    for run, code in failed:
        print(f"  failed (exit {code}): {run.run_dir}", file=out)
    return 1 if failed else 0


def _train(run: Run) -> int:
    """Train (or resume) one combination through the Python API; its exit status, as
    ``contsup train`` would end (a problem is printed as the command prints it)."""
    try:
        if run.started:
            api.train(resume=run.run_dir)
        else:
            api.train(run.recipe, run.overrides())
    except (ContsupError, KeyboardInterrupt, OSError) as exc:
        return report_failure(exc)
    return 0


def sweep_main(path: str, registries: Registries, dry_run: bool) -> int:
    """``contsup sweep``: load, validate every combination, then run or print."""
    sweep = load_sweep(path)
    problems = check_runs(sweep, registries)
    if problems:
        raise RecipeError(problems)
    if not sweep.runs():
        raise ContsupError(f"{path}: the sweep has no runs")
    return run_sweep(sweep, dry_run=dry_run)


__all__ = ["Sweep", "Run", "load_sweep", "check_runs", "run_sweep", "sweep_main", "Sequence"]

"""Resuming a run: find its newest usable checkpoint, check that the recipe has not changed,
and bring metrics.jsonl back in line with what the checkpoint holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import attrs

from contsup.training.checkpoint import checkpoint_dir, checkpoint_paths, describe, load_latest
from contsup.errors import ContsupError, RecipeError
from contsup.config.early_stop import stop_reason
from contsup.config.reading import apply_overrides, load_with_extends
from contsup.config.recipe import Recipe, load_recipe
from contsup.config.schema import SECTION, SECTIONS
from contsup.config.validation import build_recipe
from contsup.core.registry import Registries
from contsup.training.lock import RunLock
from contsup.training.paths import anchored
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


def fresh_components(table: dict, overrides: Sequence[str]) -> dict:
    """A resolved recipe's table (a loaded recipe's, or a run's ``recipe.toml``) holds every
    option of every component; an override that names another component (``context.use=...``)
    starts that component's options afresh, as a recipe file that names only ``use`` would, so
    the old component's options do not stick to the new one. The section's own keys
    (``data.batch_size``, ``context.recompute``) stay."""
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
            section = SECTION.get(path[0]) if len(path) == 2 else None
            own = {f.name for f in attrs.fields(section.own)} if section is not None else set()
            for name in [k for k in node if k != "use" and k not in own]:
                del node[name]
    return table


def load_run_recipe(path: Path, overrides: Sequence[str], registries: Registries) -> Recipe:
    """A run's resolved ``recipe.toml`` with ``overrides`` (``key.path=value``); an override of a
    component's ``use`` starts its options afresh (:func:`fresh_components`)."""
    data = fresh_components(load_with_extends(Path(path)), overrides)
    data, keys, problems = apply_overrides(data, overrides)
    try:
        recipe = build_recipe(data, str(path), registries, keys)
    except RecipeError as exc:
        raise RecipeError([*problems, *exc.problems]) from None
    if problems:
        raise RecipeError(problems)
    return recipe


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
    start); ``lock``: the run directory's lock, held from here until the run ends. ``changed``:
    the keys ``--force`` changes; ``commit`` writes what the resume changes in the run directory
    (the new recipe, metrics.jsonl cut back to the checkpoint), called once the checkpoint has
    been restored: a resume refused on the way changes nothing."""

    run_dir: Path
    recipe: Recipe
    state: dict | None
    checkpoint: Path | None
    lock: RunLock | None = None
    changed: tuple[str, ...] = ()
    commit: Callable[[], None] | None = None

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
    if recipe_path is not None:  # a recipe file: its data paths as a new run records them
        recipe = anchored(load_recipe(recipe_path, overrides, registries))
    else:
        recipe = load_run_recipe(saved_recipe, overrides, registries)
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
    _check_forced(run_dir, changed, state, recipe)
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

    def commit() -> None:
        with refused_writes(run_dir, lambda: f"{kept} and nothing in the run directory changed"):
            if changed:
                warn(f"resuming with a changed recipe (--force): {', '.join(changed)}")
                write_recipe(run_dir, recipe)
            write_metrics(run_dir, state["history"] if state is not None else [])

    return Resumption(run_dir, recipe, state, checkpoint, changed=tuple(changed), commit=commit)


# Keys a resume cannot change: the run goes on with its checkpoint's random states.
FIXED_ON_RESUME = ("run.seed",)


def _check_forced(run_dir: Path, changed: Sequence[str], state: dict | None, recipe: Recipe) -> None:
    """Refuse what ``--force`` could only pretend to apply: a new seed (the checkpoint's RNG
    states go on), or ``run.epochs`` ending the run before the point its checkpoint holds (its
    weights are from later than the metrics would say)."""
    fixed = [c for c in changed if c.split(" ", 1)[0] in FIXED_ON_RESUME]
    if fixed:
        raise ContsupError(
            f"--resume {run_dir}: {', '.join(fixed)} cannot change on a resume: the run goes on from its checkpoint's "
            f"random states, so the new value would not apply; nothing was changed: start a new run (--new) with it"
        )
    if state is None:
        return
    epochs, done = recipe.run.epochs, len(state["history"])
    needed = state["epoch"] if state["batch"] > 0 else done
    if epochs < needed:
        raise ContsupError(
            f"--resume {run_dir}: run.epochs = {epochs} would end the run before its checkpoint "
            f"({describe(state)}), whose weights are from later than epoch {epochs}; no checkpoint of the end of "
            f"epoch {epochs} is kept: set run.epochs to {needed} or more (nothing was changed)"
        )


def hyperparameters(strategy: Any) -> tuple[list[list[dict]], list[list[float]]]:
    """What a strategy's optimizers and schedules were built with from the recipe: each
    optimizer's parameter groups less their parameters, each schedule's base learning rates."""
    groups = [[{k: v for k, v in g.items() if k != "params"} for g in o.param_groups] for o in strategy.optimizers]
    return groups, [list(getattr(s, "base_lrs", [])) for s in strategy.schedulers]


def apply_hyperparameters(strategy: Any, fresh: tuple[list[list[dict]], list[list[float]]]) -> None:
    """After a checkpoint was restored: the recipe's hyper-parameters (``fresh``, from
    :func:`hyperparameters` before loading) over the saved ones, which loading an optimizer's or a
    schedule's state brings back, and each group's learning rate where the schedule now puts it."""
    groups, base_lrs = fresh
    for optimizer, saved in zip(strategy.optimizers, groups):
        for group, new in zip(optimizer.param_groups, saved):
            for key, value in new.items():
                if key != "lr" and group.get(key) != value:
                    group[key] = value
    for scheduler, base in zip(strategy.schedulers, base_lrs):
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if lambdas is None or not base:
            continue
        scheduler.base_lrs = list(base)
        lrs = [b * f(scheduler.last_epoch) for f, b in zip(lambdas, base)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = list(lrs)


def restore(trainer: Any, state: dict, changed: Sequence[str], run_dir: Path) -> None:
    """Load a checkpoint into ``trainer``; with ``changed`` keys (``--force``), the recipe's
    hyper-parameters then override the restored optimizer and schedule states. A checkpoint that
    cannot take the changes is refused naming them."""
    fresh = hyperparameters(trainer.strategy)
    try:
        trainer.load_state(state)
    except ContsupError as exc:
        if not changed:
            raise
        raise ContsupError(
            f"--resume {run_dir}: --force cannot apply {', '.join(changed)}: {exc.lines[0]}; nothing in the run "
            f"directory was changed"
        ) from None
    if changed:
        apply_hyperparameters(trainer.strategy, fresh)


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

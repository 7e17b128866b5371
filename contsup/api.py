"""The Python API: load recipes, build networks, train, evaluate and reload runs from a script or
a notebook. The ``contsup`` command, sweeps and torchrun's processes go through it too, so a run
started here is the run ``contsup train`` would make, and its problems are the same one-line
:class:`~contsup.errors.ContsupError` s the command prints.

    import contsup
    run = contsup.train("recipes/digits.toml", overrides=["run.epochs=1"], out_dir="runs/try")
    run.history[-1]["test_error_pct"], run.model
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import attrs
from torch import nn
from torch.utils.data import DataLoader

from contsup.config.recipe import Recipe
from contsup.core.registry import load_registries
from contsup.distributed.launch import train_on_ranks
from contsup.distributed.timing import summary
from contsup.distributed.world import check_single_process, launch_from_env
from contsup.errors import one_line
from contsup.model.network import GreedyNetwork
from contsup.model.network import build_network as _build
from contsup.training.device import preflight, resolve_device, seed_everything
from contsup.training.evaluation import evaluate as _evaluate
from contsup.training.failures import Interrupted
from contsup.training.loop import Trainer
from contsup.training import rundir
from contsup.training.run_evaluation import evaluate_run
from contsup.training.start import Request, open_run, prepare, recipe_from


@attrs.frozen
class Run:
    """A finished (or stopped-at-the-end) run: its directory, its recipe, one dict of metrics per
    epoch (``metrics.jsonl``'s lines, docs/runs.md) and the trained network (on the device it
    trained on, in training mode; :func:`load_model` gives a CPU copy in eval mode)."""

    run_dir: Path
    recipe: Recipe
    history: list[dict]
    model: GreedyNetwork
    timings: dict | None = None  # distributed runs: what distributed.json holds
    stopped_early: str | None = None  # why run.early_stop ended it before run.epochs

    @property
    def final(self) -> dict | None:
        """The last epoch's metrics (None when no epoch was left to train)."""
        return self.history[-1] if self.history else None

    @property
    def best(self) -> dict | None:
        """The metrics of the epoch with the lowest test error."""
        return min(self.history, key=lambda m: m["test_error_pct"]) if self.history else None

    def summary(self) -> str:
        """The run's last line, as ``contsup train`` prints it."""
        if not self.history:
            return f"no epochs to train; run directory: {self.run_dir}"
        last, best = self.final, self.best
        early = f"; stopped early after epoch {last['epoch']}: {self.stopped_early}" if self.stopped_early else ""
        return (
            f"final test error: {last['test_error_pct']:.2f}% "
            f"(best {best['test_error_pct']:.2f}% at epoch {best['epoch']}){early}; run directory: {self.run_dir}"
        )


def _warn(line: str) -> None:
    print(f"warning: {one_line(line)}", file=sys.stderr, flush=True)


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, merge (``extends``), override (``key.path=value``, as ``--set``) and check a recipe file."""
    _, registries = load_registries()
    return recipe_from(path, tuple(overrides), registries)


def build_network(recipe: Recipe | str | Path, overrides: Sequence[str] = ()) -> GreedyNetwork:
    """The recipe's network, seeded with ``run.seed`` as a run starts: K context modules, their
    adapters and heads, one ordinary ``nn.Module`` (``forward(x)`` gives logits)."""
    _, registries = load_registries()
    recipe = recipe_from(recipe, tuple(overrides), registries)
    seed_everything(recipe.run.seed)
    return _build(recipe).network


def train(
    recipe: Recipe | str | Path | None = None,
    overrides: Sequence[str] = (),
    out_dir: str | Path | None = None,
    resume: str | Path | None = None,
    *,
    new: bool = False,
    force: bool = False,
) -> Run:
    """Train a recipe (a file or one loaded) into a run directory, or continue the run in
    ``resume`` exactly from its newest checkpoint; returns the :class:`Run`.

    ``overrides`` are ``key.path=value`` strings (TOML values, as ``--set``); ``out_dir`` is the
    run directory (default ``run.out_dir``, else ``runs/<recipe name>``); ``new`` picks a fresh
    ``NAME-N`` directory when that one exists; ``force`` resumes with a changed recipe. Under
    torchrun every process calls this, and each trains its part of a distributed recipe.
    Problems raise :class:`~contsup.errors.ContsupError`; Ctrl-C (or SIGTERM, SIGHUP) stops after the
    current step with a checkpoint and raises :class:`~contsup.training.failures.Interrupted`.
    """
    pm, registries = load_registries()
    request = Request(recipe, tuple(overrides), out_dir, resume, new, force)
    launch = launch_from_env()
    if launch is not None:  # one of the processes torchrun started
        done = train_on_ranks(request, launch, pm, registries)
        if done is not None:
            return _finished(*done)
    prepared = prepare(request, registries, _warn)
    try:  # a resumed run's directory is locked from here, a new one's from open_run
        check_single_process(prepared.recipe)
        preflight(prepared.recipe)
        started = open_run(prepared, pm, new, warn=_warn)
    except BaseException:
        prepared.release()
        raise
    try:
        try:
            trainer = Trainer(started.recipe, started.run_dir, hook=pm.hook)
        except BaseException:  # e.g. the data files are missing: leave no half-made run behind
            if not started.resumed:
                rundir.discard_unstarted(started.run_dir)
            raise
        if started.state is not None:
            trainer.load_state(started.state)
        try:
            trainer.fit(on_epoch=lambda m: rundir.append_metrics(started.run_dir, m))
        except Exception as exc:
            if not started.resumed and not isinstance(exc, Interrupted):
                rundir.discard_unstarted(started.run_dir)  # failed before its first checkpoint
            raise
        trainer.finish()
    finally:
        started.release()
    return _finished(trainer)


def _finished(trainer: Trainer, timings: dict | None = None) -> Run:
    """The run's :class:`Run` (``timings``: a distributed run's); the main process prints its last lines."""
    run = Run(trainer.run_dir, trainer.recipe, list(trainer.history), trainer.network, timings, trainer.stopped_early)
    if trainer.processes.is_main:
        if run.timings is not None and run.history:
            print(summary(run.timings))
        print(run.summary(), flush=True)
    return run


def load_model(run_dir: str | Path, map_location: str = "cpu") -> GreedyNetwork:
    """Rebuild a finished run's network (adapters included) as one ``nn.Module`` in eval mode."""
    return rundir.load_model(run_dir, map_location=map_location, warn=_warn)


def evaluate(
    run: str | Path | Run | nn.Module, data: Sequence[str] = (), device: str | None = None,
    recipe: Recipe | str | Path | None = None,
) -> dict[str, Any]:
    """Test error, loss and every module head's accuracy (percent) on a test set.

    ``run`` is a run directory (its ``model.pt``, else its newest checkpoint, on its own test set
    or the one ``data`` changes ``[data]`` to: ``key=value`` strings, as ``contsup eval --data``),
    a :class:`Run`, or a network with the ``recipe`` whose test set to use."""
    if isinstance(run, Run):
        run = run.run_dir
    if isinstance(run, (str, Path)):
        _, registries = load_registries()
        return evaluate_run(Path(run), tuple(data), device, registries, _warn)
    if recipe is None:
        raise TypeError("contsup.evaluate(network, ...) needs the recipe whose test set to use: recipe=...")
    _, registries = load_registries()
    extra = [f"data.{item}" for item in data] + ([f"run.device={device}"] if device is not None else [])
    recipe = recipe_from(recipe, extra, registries)
    target = resolve_device(recipe.run.device)
    test = recipe.dataset.create().load(train=False)
    loader = DataLoader(test, batch_size=recipe.data.test_batch_size or recipe.data.batch_size, shuffle=False)
    result = _evaluate(run.to(target), loader, target)
    return {
        "run_dir": None, "weights": "the given network", "dataset": recipe.dataset.use, "images": len(test),
        "test_error_pct": result.error_pct, "test_loss": result.loss, "local_acc_pct": result.local_acc_pct,
    }


__all__ = ["Run", "train", "load_recipe", "build_network", "evaluate", "load_model"]

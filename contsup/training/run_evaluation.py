"""Evaluating a run after the fact: its final model (or newest checkpoint) on the test set of
its own dataset, or of the dataset its ``[data]`` table is changed to."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader

from contsup.training.checkpoint import describe, load_latest
from contsup.errors import ContsupError, RecipeError, reason
from contsup.core.registry import Registries
from contsup.training.rundir import CLASSES_FILE, MODEL_FILE, RECIPE_FILE, check_recipe_unchanged, read_classes, read_model_file
from contsup.training.paths import path_options
from contsup.training.resume import load_run_recipe
from contsup.training.device import resolve_device
from contsup.training.evaluation import evaluate
from contsup.model.network import build_network
from contsup.config.recipe import load_recipe


def run_weights(run_dir: Path, warn: Callable[[str], None]) -> tuple[dict[str, torch.Tensor], str]:
    """The network weights of ``model.pt``, else of the newest usable checkpoint, and which they are."""
    model = run_dir / MODEL_FILE
    if model.exists():
        return read_model_file(model, warn), MODEL_FILE
    found = load_latest(run_dir, warn, tidy=False)  # the run may be training: touch none of its files
    if found is None:
        raise ContsupError(f"{run_dir}: has neither {MODEL_FILE} nor a checkpoint to evaluate")
    state, path = found
    return state["model"], f"checkpoint {path.name} ({describe(state)})"


def _as_typed(problem: str) -> str:
    """A recipe problem about an override, in terms of ``--data KEY=VALUE`` and ``--device``."""
    typed = re.sub(r"--set data\.", "--data ", problem).replace("--set run.device", "--device")
    return typed.replace("expected key.path=value", "expected KEY=VALUE") if typed.startswith("--data ") else typed


def _data_differences(run: Any, now: Any) -> list[str]:
    """What the network cannot take: another input shape or number of classes than the run's."""
    out = []
    if tuple(run.input_shape) != tuple(now.input_shape):
        out.append(f"inputs of shape {tuple(now.input_shape)}, the run's network takes {tuple(run.input_shape)}")
    if run.num_classes != now.num_classes:
        out.append(f"{now.num_classes} classes, the run's network has {run.num_classes}")
    return out


def check_classes(run_dir: Path, dataset: Any, described: str) -> None:
    """The data's class names against those the run recorded (``classes.json``), when both are known."""
    recorded = read_classes(run_dir)
    if recorded is None or not hasattr(dataset, "classes"):
        return
    names = [str(n) for n in dataset.classes()]
    if names != recorded:
        only_run = [n for n in recorded if n not in names]
        only_data = [n for n in names if n not in recorded]
        what = (f"the run's {', '.join(only_run[:5])} are not there and {', '.join(only_data[:5])} are new"
                if only_run or only_data else "the same names in another order")
        raise ContsupError(
            f"{run_dir}: {described} has the classes {names[:10]}, the run was trained on {recorded[:10]} "
            f"({CLASSES_FILE}): {what}; its labels would not mean the run's classes: evaluate on data with the run's classes"
        )


def warn_relative(recipe: Any, warn: Callable[[str], None]) -> None:
    """A run written before runs recorded absolute data paths: its relative ``data.root`` is read
    from the current folder, which may not be where the run was trained."""
    for name, value in path_options(recipe.dataset.options).items():
        if not Path(value).expanduser().is_absolute():
            warn(f"data.{name} = \"{value}\" is relative: read from the current folder, {Path.cwd()}, which may not be "
                 f"where the run was trained; pass --data {name}=PATH to be sure")


def evaluate_run(
    run_dir: Path, data: Sequence[str], device: str | None, registries: Registries, warn: Callable[[str], None]
) -> dict[str, Any]:
    """Test error, loss and each module head's accuracy; ``data`` items are ``key=value`` for ``[data]``."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / RECIPE_FILE).exists():
        raise ContsupError(f"{run_dir}: not a run directory (it has no {RECIPE_FILE})")
    check_recipe_unchanged(run_dir)
    overrides = [f"data.{item}" for item in data]
    if device is not None:
        overrides.append(f"run.device={device}")
    try:  # data.use=OTHER starts [data] afresh: the run's dataset's options do not stick to another
        recipe = load_run_recipe(run_dir / RECIPE_FILE, overrides, registries)
    except RecipeError as exc:  # name the options the user typed, not the --set they became
        raise RecipeError([_as_typed(problem) for problem in exc.problems]) from None
    own = load_recipe(run_dir / RECIPE_FILE, [o for o in overrides if not o.startswith("data.")], registries)
    described = f"the data of --data {' '.join(data)}" if data else "its data"
    if not any(item.split("=", 1)[0].strip() in path_options(recipe.dataset.options) for item in data):
        warn_relative(recipe, warn)
    weights, which = run_weights(run_dir, warn)
    network = build_network(recipe).network
    try:
        network.load_state_dict(weights)
    except RuntimeError as exc:
        raise ContsupError(f"{run_dir}: the saved weights do not fit the network for this [data] ({reason(exc)})") from None
    # weights that load may still not fit the data: convolutions take any image size
    differences = _data_differences(own.dataset.create().info(), recipe.dataset.create().info()) if data else []
    if differences:
        raise ContsupError(f"{run_dir}: {described} gives {'; '.join(differences)}; evaluate it on data of the run's "
                           f"input shape and classes")
    target = resolve_device(recipe.run.device)
    network = network.to(target)
    dataset = recipe.dataset.create()
    check_classes(run_dir, dataset, described)
    test = dataset.load(train=False)
    if len(test) == 0:
        raise ContsupError(f"{run_dir}: {described} holds no test images; evaluate on a test set with images")
    loader = DataLoader(
        test, batch_size=recipe.data.test_batch_size or recipe.data.batch_size, shuffle=False,
        num_workers=recipe.data.workers, pin_memory=target.type == "cuda",
    )
    result = evaluate(network, loader, target)
    return {
        "run_dir": str(run_dir),
        "weights": which,
        "dataset": recipe.dataset.use,
        "images": len(test),
        "test_error_pct": result.error_pct,
        "test_loss": result.loss,
        "local_acc_pct": result.local_acc_pct,
    }

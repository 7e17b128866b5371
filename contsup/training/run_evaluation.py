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
from contsup.training.rundir import MODEL_FILE, RECIPE_FILE, read_model_file
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


def evaluate_run(
    run_dir: Path, data: Sequence[str], device: str | None, registries: Registries, warn: Callable[[str], None]
) -> dict[str, Any]:
    """Test error, loss and each module head's accuracy; ``data`` items are ``key=value`` for ``[data]``."""
    run_dir = Path(run_dir)
    if not (run_dir / RECIPE_FILE).exists():
        raise ContsupError(f"{run_dir}: not a run directory (it has no {RECIPE_FILE})")
    overrides = [f"data.{item}" for item in data]
    if device is not None:
        overrides.append(f"run.device={device}")
    try:
        recipe = load_recipe(run_dir / RECIPE_FILE, overrides, registries)
    except RecipeError as exc:  # name the options the user typed, not the --set they became
        raise RecipeError([_as_typed(problem) for problem in exc.problems]) from None
    weights, which = run_weights(run_dir, warn)
    network = build_network(recipe).network
    try:
        network.load_state_dict(weights)
    except RuntimeError as exc:
        raise ContsupError(f"{run_dir}: the saved weights do not fit the network for this [data] ({reason(exc)})") from None
    target = resolve_device(recipe.run.device)
    network = network.to(target)
    dataset = recipe.dataset.create()
    test = dataset.load(train=False)
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

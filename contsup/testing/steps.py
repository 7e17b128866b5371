"""``greedy_steps``, for a training method's own tests: the recipe's network and the step the engine
trains it with, one batch at a time, so a test can read the network between two steps."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from contsup.model.network import GreedyNetwork, build_network
from contsup.testing.plugins import recipe as load
from contsup.training.precision import Precision
from contsup.training.strategies import StepStats, make_strategy


class GreedySteps:
    """A recipe's network, freshly built and initialised as a run starts (in training mode, on the
    CPU), with its greedy step: ``network``, ``method`` (the recipe's active training method, as
    the step calls it; None: plain greedy) and :meth:`step`."""

    def __init__(self, recipe: Any, steps_per_epoch: int = 10) -> None:
        if recipe.run.mode != "greedy":
            raise ValueError(f"greedy_steps needs run.mode = \"greedy\", not \"{recipe.run.mode}\"")
        self.recipe = recipe
        torch.manual_seed(recipe.run.seed)
        built = build_network(recipe)
        self.info = built.info
        self.network: GreedyNetwork = built.network.train()
        self._strategy = make_strategy(recipe, self.network, steps_per_epoch, Precision())
        self.method = getattr(self._strategy, "method", None)
        self._batches = torch.Generator().manual_seed(recipe.run.seed)

    def batch(self, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A seeded random batch of the recipe's input shape: x (B, C, H, W), y (B,); B is
        ``data.batch_size`` unless ``size`` says otherwise."""
        b = size or self.recipe.data.batch_size
        x = torch.randn((b, *self.info.input_shape), generator=self._batches)
        y = torch.randint(0, self.info.num_classes, (b,), generator=self._batches)
        return x, y

    def step(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> list[float]:
        """One greedy step on (x, y), or on the next :meth:`batch`: every module's forward, loss,
        backward and optimizer step, with the method's hooks, as training takes it. Returns each
        module's local loss."""
        if x is None or y is None:
            x, y = self.batch()
        stats = StepStats(self.network.num_modules)
        self._strategy.step(x, y, stats, _no_check)
        return [float(loss) for loss in stats.mean_loss()]


def _no_check(_module: int, _loss: torch.Tensor) -> None:
    pass


def greedy_steps(recipe_or_path: Any, *plugins: object, overrides: Sequence[str] = (), steps_per_epoch: int = 10) -> GreedySteps:
    """The recipe's network and greedy step (:class:`GreedySteps`), with the built-ins plus
    ``plugins``; the recipe is a :class:`~contsup.config.recipe.Recipe`, a path or TOML text.
    ``steps_per_epoch`` sets the schedule's length (``run.epochs`` times it); no data is read."""
    return GreedySteps(load(recipe_or_path, *plugins, overrides=overrides), steps_per_epoch)


__all__ = ["GreedySteps", "greedy_steps"]

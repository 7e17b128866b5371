"""The processes a run spans, as the training loop sees them: who writes the run directory, this
process's share of the data, the strategy it trains with, and a few collectives.

:class:`OneProcess` is a run in this process alone: its share is all of the data, and every
collective returns its input (a sum over one process is its own value). The data-parallel and
pipeline answers live in :mod:`contsup.distributed`; the loop (:mod:`contsup.training.loop`)
never asks how many processes there are.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Iterator, Protocol, TextIO

import attrs
import torch

from contsup.training.loaders import batches_problem, make_loaders
from contsup.training.order import epoch_batches, global_batch_size
from contsup.training.precision import Precision, to_memory_format
from contsup.training.strategies import Strategy, make_strategy
from contsup.protocols import Dataset

if TYPE_CHECKING:
    from contsup.config.recipe import Recipe
    from contsup.model.network import Built, GreedyNetwork


@attrs.frozen
class Batch:
    """One training step's data on this process: x: (B, C, H, W) and y: (B,) (None on a pipeline
    stage that receives its inputs from the one before), and the images of the step over every
    process."""

    x: torch.Tensor | None
    y: torch.Tensor | None
    images: int

    @property
    def share(self) -> float:
        """This process's share of the step's batch: the weight of its loss."""
        return 1.0 if self.y is None or len(self.y) == self.images else len(self.y) / self.images


@attrs.frozen
class Setup:
    """What a strategy is built from: the run's recipe, its network and where it trains."""

    recipe: Recipe
    network: GreedyNetwork
    built: Built
    steps_per_epoch: int
    precision: Precision
    device: torch.device
    channels_last: bool
    log: TextIO


class Processes(Protocol):
    """How this process takes part in a run. Every process calls each method at the same point of
    the loop; those marked collective exchange data with the others."""

    rank: int
    size: int
    needs_agreement: bool  # a stop must be agreed on before a checkpoint can be written
    signal_grace_s: float  # a second stop signal within this many seconds repeats the first
    keeps_sums: bool  # a resumed epoch's running sums stay on this process (each counted once)

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run directory, prints and runs the observers."""

    def loaders(self, recipe: Recipe, dataset: Dataset, device: torch.device) -> tuple[Any, Any, int]:
        """(training loader, test loader, images in the whole training set), this process's share
        of each batch; the training loader's length is the steps per epoch. Collective."""

    def strategy(self, setup: Setup) -> Strategy:
        """How this process learns: the recipe's strategy over the modules it trains. Collective."""

    def batches(self, loader: Any, start_state: torch.Tensor, done: int, device: torch.device, channels_last: bool) -> Iterator[Batch]:
        """The epoch's remaining steps (its order from ``start_state``), after the ``done`` trained."""

    def any_rank(self, wanted: bool) -> bool:
        """Whether any process ``wanted`` (a stop): every process stops at the same step. Collective."""

    def sum(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """``t`` summed over the processes (float64 running sums and test counts). Collective."""

    def gather(self, obj: Any, what: str) -> list[Any] | None:
        """Every process's ``obj`` in rank order on the main one (None elsewhere). Collective."""

    def guard(self, what: str) -> ContextManager[None]:
        """Communication during ``what``; a lost process becomes one clear error."""

    def resume_command(self, run_dir: Path) -> str:
        """The command that continues the run."""


def local_batches(
    loader: Any, start_state: torch.Tensor, done: int, device: torch.device, channels_last: bool, train_size: int,
    batch_size: int,
) -> Iterator[Batch]:
    """This process's part of each remaining batch of the epoch, counted as the images of the
    whole batch (of every process sharing it)."""
    for x, y in epoch_batches(loader, start_state, done):
        x = to_memory_format(x.to(device, non_blocking=True), channels_last)
        yield Batch(x, y.to(device, non_blocking=True), global_batch_size(done, train_size, batch_size))
        done += 1


class OneProcess:
    """A run in this process alone: all of the data, and collectives that return their input."""

    rank, size = 0, 1
    needs_agreement = False
    signal_grace_s = 0.0
    keeps_sums = True
    is_main = True

    def __init__(self) -> None:
        self.train_size = 0
        self.batch_size = 0

    def loaders(self, recipe: Recipe, dataset: Dataset, device: torch.device) -> tuple[Any, Any, int]:
        train, test, self.train_size = make_loaders(recipe, dataset, device)
        self.batch_size = recipe.data.batch_size
        problem = batches_problem(recipe, self.train_size)
        if problem is not None:
            raise problem
        return train, test, self.train_size

    def strategy(self, setup: Setup) -> Strategy:
        return make_strategy(setup.recipe, setup.network, setup.steps_per_epoch, setup.precision)

    def batches(self, loader: Any, start_state: torch.Tensor, done: int, device: torch.device, channels_last: bool) -> Iterator[Batch]:
        return local_batches(loader, start_state, done, device, channels_last, self.train_size, self.batch_size)

    def any_rank(self, wanted: bool) -> bool:
        return wanted

    def sum(self, t: torch.Tensor, what: str) -> torch.Tensor:
        return t

    def gather(self, obj: Any, what: str) -> list[Any]:
        return [obj]

    def guard(self, what: str) -> ContextManager[None]:
        return contextlib.nullcontext()

    def resume_command(self, run_dir: Path) -> str:
        return f"contsup train --resume {run_dir}"


__all__ = ["Processes", "OneProcess", "Batch", "Setup", "local_batches"]

"""What differs between training in one process and across several: the :class:`Parallel`
interface the one training loop calls, and :class:`OneProcess`, its implementation that does
nothing (reductions return their input, agreement is one's own wish, nothing is sent).

The data-parallel and pipeline implementations live in :mod:`contsup.distributed`; the loop
(:mod:`contsup.training.loop`) never asks how many processes there are.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Iterator, Protocol

import attrs
import torch

from contsup.training.evaluation import Evaluation, evaluate
from contsup.training.loaders import batches_problem, make_loaders
from contsup.training.order import epoch_batches
from contsup.training.precision import to_memory_format
from contsup.training.strategies import Check, StepStats, Strategy
from contsup.protocols import Dataset

if TYPE_CHECKING:
    from contsup.config.recipe import Recipe
    from contsup.model.network import Built, GreedyNetwork
    from contsup.training.precision import Precision


@attrs.frozen
class Batch:
    """One training step's data on this process: x: (B, C, H, W) and y: (B,) (None where a
    pipeline stage receives them later), the images of the step over every process, and
    whatever the implementation needs to carry (a pipeline message)."""

    x: torch.Tensor | None
    y: torch.Tensor | None
    images: int
    message: Any = None


@attrs.frozen
class Gathered:
    """What a checkpoint needs from every process: the epoch's running sums over all of them
    (None: this process's own), and entries to add to the checkpoint."""

    partial: StepStats | None = None
    extra: dict = attrs.field(factory=dict)


class EpochProgress(Protocol):
    """Where an epoch stands (:class:`contsup.training.loop.EpochProgress`): its order and the
    steps done, with their running sums."""

    start_state: torch.Tensor
    stats: StepStats
    done: int


class TrainerView(Protocol):
    """What a :class:`Parallel` may read of the trainer it takes part in: public attributes only
    (:class:`contsup.training.loop.Trainer` has them)."""

    recipe: Recipe
    run_dir: Path
    device: torch.device
    precision: Precision
    channels_last: bool
    built: Built
    network: GreedyNetwork
    strategy: Strategy
    test_loader: Any
    steps_per_epoch: int
    history: list[dict]
    current: EpochProgress | None
    info: Any  # RunInfo: step and epoch
    log: Any

    def kept(self) -> str:
        """What is left to resume from, for failure messages."""

    def mid_epoch(self) -> bool:
        """Whether an epoch is under way."""


class Parallel(Protocol):
    """How one process takes part in a run. Every method is called by every process at the same
    point of the loop; those marked collective exchange data with the others."""

    is_main: bool  # writes the run directory, prints, runs the observers
    needs_agreement: bool  # a stop must be agreed on before a checkpoint can be written
    signal_grace_s: float  # a second stop signal within this many seconds repeats the first

    def loaders(self, recipe: Recipe, dataset: Dataset, device: torch.device) -> tuple[Any, Any, int]:
        """(training loader, test loader, images in the whole training set); the training
        loader's length is the steps per epoch, the same on every process. Collective."""

    def attach(self, trainer: TrainerView) -> None:
        """Called once the network, loaders and strategy exist: share initial weights, plan
        stages, and so on. Collective."""

    def sync_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Sum ``optimizer``'s gradients over the processes sharing its batch. Collective."""

    def begin_epoch(self) -> None:
        """An epoch's training begins (timings restart)."""

    def batches(self, loader: Any, cur: EpochProgress, device: torch.device, channels_last: bool) -> Iterator[Batch]:
        """The epoch's remaining steps, after the ``cur.done`` already trained."""

    def train_step(self, strategy: Strategy, batch: Batch, stats: StepStats, check: Check, epoch: int, step: int) -> None:
        """Train this process's modules on ``batch``, step ``step`` (1-based) of ``epoch``."""

    def agree_stop(self, wanted: bool) -> bool:
        """Whether every process stops here: True when any process ``wanted`` to. Collective."""

    def end_training(self) -> None:
        """The epoch's training steps are done (wait for what is still being sent)."""

    def reduce_stats(self, stats: StepStats) -> StepStats:
        """The epoch's running sums over every process's images. Collective."""

    def evaluate(self, trainer: TrainerView) -> Evaluation:
        """The test set's result over every process. Collective."""

    def record_epoch(self, epoch: int, images: int, elapsed: float) -> None:
        """An epoch ended: keep its timings. Collective."""

    def gather(self, trainer: TrainerView) -> Gathered:
        """Bring what other processes hold into this one's trainer for a checkpoint or the final
        model. Collective."""

    def restore(self, state: dict, resumed: EpochProgress | None) -> None:
        """After a checkpoint was loaded: what is this process's own (its RNG, its running sums)."""

    def resume_command(self, run_dir: Path) -> str:
        """The command that continues the run."""

    def guard(self, what: str) -> ContextManager[None]:
        """Communication during ``what``; a lost process becomes one clear error."""

    def finish(self, run_dir: Path) -> None:
        """After the run: write what only this kind of run records. Collective."""

    def report(self) -> dict | None:
        """What the run's timings say, for its last lines (None: nothing to say)."""


class OneProcess:
    """Training in this process alone: every collective is the identity."""

    is_main = True
    needs_agreement = False
    signal_grace_s = 0.0

    def loaders(self, recipe: Recipe, dataset: Dataset, device: torch.device) -> tuple[Any, Any, int]:
        train, test, size = make_loaders(recipe, dataset, device)
        problem = batches_problem(recipe, size)
        if problem is not None:
            raise problem
        return train, test, size

    def attach(self, trainer: TrainerView) -> None:
        pass

    def sync_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def begin_epoch(self) -> None:
        pass

    def batches(self, loader: Any, cur: EpochProgress, device: torch.device, channels_last: bool) -> Iterator[Batch]:
        for x, y in epoch_batches(loader, cur.start_state, cur.done):
            x = to_memory_format(x.to(device, non_blocking=True), channels_last)
            yield Batch(x, y.to(device, non_blocking=True), len(y))

    def train_step(self, strategy: Strategy, batch: Batch, stats: StepStats, check: Check, epoch: int, step: int) -> None:
        strategy.step(batch.x, batch.y, stats, check)

    def agree_stop(self, wanted: bool) -> bool:
        return wanted

    def end_training(self) -> None:
        pass

    def reduce_stats(self, stats: StepStats) -> StepStats:
        return stats

    def evaluate(self, trainer: TrainerView) -> Evaluation:
        return evaluate(trainer.network, trainer.test_loader, trainer.device, trainer.precision, trainer.channels_last)

    def record_epoch(self, epoch: int, images: int, elapsed: float) -> None:
        pass

    def gather(self, trainer: TrainerView) -> Gathered:
        return Gathered()

    def restore(self, state: dict, resumed: EpochProgress | None) -> None:
        pass

    def resume_command(self, run_dir: Path) -> str:
        return f"contsup train --resume {run_dir}"

    def guard(self, what: str) -> ContextManager[None]:
        return contextlib.nullcontext()

    def finish(self, run_dir: Path) -> None:
        pass

    def report(self) -> dict | None:
        return None


__all__ = ["Parallel", "OneProcess", "Batch", "Gathered"]

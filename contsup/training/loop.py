"""The training loop: one run of a recipe, epoch by epoch and step by step, in one process or in
any of the processes of a distributed run.

What differs between one process, data-parallel, pipeline and grid training sits behind
:class:`contsup.training.processes.Processes`; how the network learns from a batch (greedy or
end to end) behind :class:`contsup.training.strategies.Strategy`; checkpoints in
:mod:`contsup.training.checkpointer`, stop requests in :mod:`contsup.training.stopping`.
Nothing here knows a concrete model, loss or dataset: those are plugins.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TextIO

import attrs
import torch

from contsup.config.early_stop import stop_reason
from contsup.errors import BatchError, UnreadableData, one_line
from contsup.model.network import Built, GreedyNetwork, build_network
from contsup.training.checkpointer import Checkpointer, EpochState, Position, capture, restore
from contsup.training.device import peak_memory, resolve_device, seed_everything
from contsup.training.evaluation import EvalCounts, Evaluation
from contsup.training.failures import TrainingFailed, calmer, non_finite_loss, out_of_memory, unusable_batch
from contsup.training.precision import Precision, apply_device_options, check_precision
from contsup.training.processes import OneProcess, Processes, Setup
from contsup.training.progress import Progress
from contsup.training.rundir import save_model, write_classes
from contsup.training.stopping import StopRequests
from contsup.training.strategies import Check, StepStats

if TYPE_CHECKING:
    from contsup.config.recipe import Recipe


@attrs.define
class RunInfo:
    """What observers receive: the recipe, the run directory and the network being trained.
    ``epoch`` is the epoch in progress (at ``on_run_start``: the epochs already done, > 0 on resume)."""

    recipe: Recipe
    run_dir: Path
    network: GreedyNetwork
    plans: list
    device: torch.device
    epoch: int = 0
    step: int = 0


class Trainer:
    """One run of a recipe: builds everything, trains for ``run.epochs``, evaluates every epoch.

    With ``checkpoints`` on (the default) it writes a checkpoint into ``run_dir/checkpoints`` at
    the end of every epoch and every ``run.checkpoint_every_steps`` steps; ``load_state`` resumes
    from one exactly. Ctrl-C during ``fit`` stops after the current step with a checkpoint.
    ``processes``: this process's part in the run (default: the whole run, in this process);
    ``callbacks``: objects told of each epoch on every process (``on_epoch_start()``,
    ``on_epoch_end(epoch, images, seconds)``, ``on_run_end(run_dir)``), where observers run on
    the main process alone.
    """

    def __init__(
        self, recipe: Recipe, run_dir: Path, hook: Any = None, log: TextIO | None = None, checkpoints: bool = True,
        processes: Processes | None = None, callbacks: Sequence[Any] = (),
    ) -> None:
        self.processes: Processes = processes or OneProcess()
        main = self.processes.is_main
        quiet = None if main else open(os.devnull, "w")
        self.recipe, self.run_dir = recipe, Path(run_dir)
        self.hook = hook if main else None
        self.callbacks = list(callbacks)
        self.log = (log or sys.stdout) if main else quiet
        self.progress_stream = sys.stderr if main else quiet  # where the progress lines go
        self.device = resolve_device(recipe.run.device)
        check_precision(recipe.run.precision, self.device)
        self.precision = Precision(recipe.run.precision, self.device)
        self.channels_last = recipe.run.channels_last
        apply_device_options(recipe.run.deterministic, self.device)
        seed_everything(recipe.run.seed)
        self.built: Built = build_network(recipe)
        self.network = self.built.network.to(self.device)
        if self.channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)
        self.dataset = recipe.dataset.create()
        self.train_loader, self.test_loader, self.train_size = self.processes.loaders(recipe, self.dataset, self.device)
        self.steps_per_epoch = len(self.train_loader)
        if main and hasattr(self.dataset, "classes") and self.run_dir.is_dir():
            write_classes(self.run_dir, self.dataset.classes())  # the dataset names its classes: classes.json
        self.strategy = self.processes.strategy(Setup(
            recipe, self.network, self.built, self.steps_per_epoch, self.precision, self.device, self.channels_last, self.log,
        ))
        self.info = RunInfo(recipe, self.run_dir, self.network, self.built.plans, self.device)
        self.history: list[dict] = []
        self.epoch: EpochState | None = None  # the epoch under way (between epochs: the last one)
        self.resumed: EpochState | None = None  # the epoch a mid-epoch checkpoint stopped inside
        self.checkpointer = Checkpointer(self.run_dir, self.processes, checkpoints)
        self.stops = StopRequests(self.processes)
        self.in_step = False  # inside a step: the state is not consistent
        self.stopped_early: str | None = None  # why run.early_stop ended the run before run.epochs

    # -- the run ----------------------------------------------------------------------------

    def fit(self, on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
        """Train the remaining epochs; ``on_epoch`` sees each epoch's metrics (e.g. to write them)."""
        self.stops.reset()
        with self.stops.from_signals():
            try:
                return self._fit(on_epoch)
            except KeyboardInterrupt:
                raise self._interrupted() from None

    def _fit(self, on_epoch: Callable[[dict], None] | None) -> list[dict]:
        if self.hook is not None:
            self.hook.on_run_start(run=self.info)
        epochs = self.recipe.run.epochs
        for epoch in range(len(self.history) + 1, epochs + 1):
            if self._stops_early():  # the epochs so far are enough (a resumed run that had stopped: at once)
                break
            self.info.epoch = epoch
            metrics = self.train_epoch(epoch)
            self.history.append(metrics)
            if on_epoch is not None and self.processes.is_main:
                with self.checkpointer.refused_writes(has_history=True):
                    on_epoch(metrics)
            self.log.write(summary_line(metrics, epochs) + "\n")
            self.log.flush()
            self.save_checkpoint()
            if self.hook is not None:
                self.hook.on_epoch_end(run=self.info, epoch=epoch, metrics=metrics)
            if epoch < epochs and self.stops.agree():
                raise self._interrupted()
        if self.hook is not None:
            self.hook.on_run_end(run=self.info, metrics=self.history[-1] if self.history else None)
        return self.history

    def train_epoch(self, epoch: int) -> dict:
        """One epoch of training then evaluation; returns that epoch's metrics. An epoch resumed
        from a mid-epoch checkpoint continues after its last step with its running sums."""
        run = self.recipe.run
        cur = self._begin_epoch(epoch)
        progress = Progress(epoch, run.epochs, self.steps_per_epoch, run.log_every, stream=self.progress_stream, done=cur.done)
        for callback in self.callbacks:
            callback.on_epoch_start()
        cur.restart_clock()
        batches = self.processes.batches(self.train_loader, cur.start_state, cur.done, self.device, self.channels_last)
        with self._training_failures(epoch, cur), contextlib.closing(progress):
            for batch in batches:
                step = cur.done + 1
                self.in_step = True
                with self.processes.guard(f"training step {step} of epoch {epoch}"):
                    self.strategy.step(batch.x, batch.y, cur.stats, self._check(epoch, step), batch.share)
                cur.done, cur.images, self.info.step = step, cur.images + batch.images, self.info.step + 1
                self.in_step = False
                progress.update(cur.done, cur.stats.mean_loss())
                every = run.checkpoint_every_steps
                if every and self.info.step % every == 0 and cur.done < self.steps_per_epoch:
                    self.save_checkpoint()
                if self.stops.agree():
                    raise self._interrupted()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats = StepStats.from_tensor(self.processes.sum(cur.stats.as_tensor(self.strategy.modules), "summing the training metrics"), cur.stats.modules)
        elapsed = cur.elapsed()
        result = self._evaluate(epoch, cur.done)
        for callback in self.callbacks:
            callback.on_epoch_end(epoch, cur.images, elapsed)
        return epoch_metrics(epoch, self.info.step, self.strategy.lr(), stats, result, cur.images, elapsed, self.device)

    def _begin_epoch(self, epoch: int) -> EpochState:
        """Training mode and where the epoch starts: after the steps of a mid-epoch checkpoint it
        was resumed from, with their running sums, or at its first step."""
        self.network.train()
        cur = self.resumed if self.resumed is not None and self.resumed.epoch == epoch else None
        self.resumed = None
        if cur is None:
            cur = EpochState(epoch, self.train_loader.generator.get_state(), StepStats(self.network.num_modules))
        self.epoch = cur
        return cur

    def _evaluate(self, epoch: int, step: int) -> Evaluation:
        """The test set's result over every process (each counts its share and its heads)."""
        try:
            counts = self.strategy.evaluate(self.test_loader, self.device, self.precision, self.channels_last)
        except torch.cuda.OutOfMemoryError:
            raise self._out_of_memory(epoch, step, evaluating=True) from None
        except UnreadableData as exc:
            raise self._unreadable(exc, f"evaluating after epoch {epoch}") from None
        total = self.processes.sum(counts.as_tensor(self.strategy.modules), "summing the test results")
        return EvalCounts.from_tensor(total, counts.modules).result()

    def _stops_early(self) -> bool:
        """Whether ``run.early_stop`` ends the run after the epochs trained so far (collective:
        every process stops when the main one does); says why on the run's log."""
        if not self.recipe.run.early_stop:
            return False
        reason = stop_reason(self.recipe.run.early_stop, self.history)
        if not self.processes.any_rank(reason is not None):
            return False
        self.stopped_early = reason or "the main process's metrics said so"
        self.log.write(f"early stop after epoch {len(self.history)} of {self.recipe.run.epochs}: {self.stopped_early}\n")
        self.log.flush()
        return True

    def finish(self) -> None:
        """After ``fit``: the final weights on the main process (collective), which writes the
        model (``model.pt``) and tells the callbacks."""
        state = self.strategy.state()
        if self.processes.is_main:
            if state["model"] is not None and not _same_tensors(self.network.state_dict(), state["model"]):
                self.network.load_state_dict(state["model"])  # a pipeline's other stages trained elsewhere
            with self.checkpointer.refused_writes(has_history=bool(self.history)):
                save_model(self.run_dir, self.network)
        for callback in self.callbacks:
            callback.on_run_end(self.run_dir)

    # -- checkpoints ------------------------------------------------------------------------

    @property
    def position(self) -> Position:
        return Position(self.info.step, len(self.history))

    def mid_epoch(self) -> bool:
        """Whether an epoch is under way (some of its steps done, its metrics not yet recorded)."""
        return self.epoch is not None and self.epoch.epoch == len(self.history) + 1

    def checkpoint_state(self) -> dict:
        """Everything a resumed run needs (collective; see :func:`contsup.training.checkpointer.capture`)."""
        return capture(
            self.recipe, self.strategy, self.processes, self.position, self.history,
            self.epoch if self.mid_epoch() else None, self.steps_per_epoch, self.train_loader.generator.get_state(),
        )

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the run as it stands (between two steps); None when checkpoints are off."""
        return self.checkpointer.save(self.position, self.checkpoint_state, self.network, calmer(self.recipe))

    def load_state(self, state: dict) -> None:
        """Continue from a checkpoint (see :mod:`contsup.training.checkpoint`): weights, optimizers,
        schedules, scalers, metrics, data order, position and finally the RNG states."""
        self.resumed = restore(state, self.strategy, self.processes, self.network.num_modules, self.steps_per_epoch, self.train_loader.generator)
        self.history = [dict(m) for m in state["history"]]
        self.info.step = state["global_step"]
        self.info.epoch = len(self.history)

    def request_stop(self) -> None:
        """Stop after the current step, writing a checkpoint (what the first Ctrl-C does)."""
        self.stops.request()

    # -- failures ---------------------------------------------------------------------------

    def _interrupted(self) -> Exception:
        consistent = not self.in_step and not self.checkpointer.writing
        return self.stops.interrupted(consistent, self.checkpointer, self.save_checkpoint, self.processes.resume_command(self.run_dir))

    def _check(self, epoch: int, step: int) -> Check:
        def check(module: int, loss: torch.Tensor) -> None:
            if not torch.isfinite(loss.detach()).all():
                raise non_finite_loss(module, float(loss.detach()), epoch, step, self.recipe, self.checkpointer.describe_kept())

        return check

    def _out_of_memory(self, epoch: int, step: int, evaluating: bool) -> TrainingFailed:
        k, units = self.network.num_modules, len(self.built.unit_shapes)
        return out_of_memory(self.strategy.active_module, k, units, epoch, step, evaluating, self.checkpointer.describe_kept())

    @contextlib.contextmanager
    def _training_failures(self, epoch: int, cur: EpochState) -> Iterator[None]:
        """Training steps that run out of GPU memory, or meet a batch their local loss cannot use,
        end in one line naming the module, the epoch and the step."""
        try:
            yield
        except torch.cuda.OutOfMemoryError:
            raise self._out_of_memory(epoch, cur.done + 1, evaluating=False) from None
        except BatchError as exc:
            step = cur.done + 1
            raise unusable_batch(
                exc, self.strategy.active_module, epoch, step, step == self.steps_per_epoch, self.train_size, self.recipe,
                self.checkpointer.describe_kept(),
            ) from None
        except UnreadableData as exc:
            raise self._unreadable(exc, f"reading step {cur.done + 1} of epoch {epoch}") from None

    def _unreadable(self, exc: UnreadableData, where: str) -> TrainingFailed:
        """A data file that does not decode: the dataset's line (naming the file), where, and a
        checkpoint of the run as it stands (the batch was not trained yet) to resume from."""
        if self.checkpointer.enabled and not self.in_step and not self.processes.needs_agreement:
            self.save_checkpoint()
            path, at, _ = self.checkpointer.last
            kept = f"saved checkpoint {path} ({at}); continue with: {self.processes.resume_command(self.run_dir)}"
        else:
            kept = self.checkpointer.describe_kept()
        return TrainingFailed(f"{one_line(str(exc))} ({where}); {kept}")


def _same_tensors(a: dict, b: dict) -> bool:
    """Whether two state dicts hold the very same tensors (not copies)."""
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)


def epoch_metrics(
    epoch: int, step: int, lr: float, stats: StepStats, result: Evaluation, images: int, elapsed: float,
    device: torch.device,
) -> dict:
    """One epoch's line of metrics.jsonl (docs/runs.md describes every field)."""
    memory, memory_kind = peak_memory(device)
    return {
        "epoch": epoch,
        "step": step,
        "lr": lr,
        "train_loss": stats.mean_loss(),
        "train_acc_pct": stats.accuracy(),
        "test_error_pct": result.error_pct,
        "test_loss": result.loss,
        "test_local_acc_pct": result.local_acc_pct,
        "images_per_s": images / elapsed if elapsed > 0 else None,
        "epoch_time_s": elapsed,
        "peak_memory_bytes": memory,
        "memory_kind": memory_kind,
    }


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_line(m: dict, epochs: int) -> str:
    """One readable line per epoch."""
    local = [f"{a:.1f}" for a in m["test_local_acc_pct"] if a is not None]
    if len(local) > 8:
        local = local[:3] + ["..."] + local[-3:]
    return (
        f"epoch {m['epoch']}/{epochs}: test error {m['test_error_pct']:.2f}% | "
        f"local acc % {' '.join(local) or '-'} | {_number(m['images_per_s'], '.0f')} img/s | {m['epoch_time_s']:.1f}s"
    )


__all__ = ["Trainer", "RunInfo", "EpochState", "epoch_metrics", "summary_line"]

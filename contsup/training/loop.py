"""The training loop: one run of a recipe, epoch by epoch and step by step, in one process or in
any of the processes of a distributed run.

Everything that differs between one process, data-parallel, pipeline and grid training sits
behind :class:`contsup.training.parallel.Parallel`; how the network learns from a batch (greedy
or end to end) sits behind :class:`contsup.training.strategies.Strategy`. Nothing here knows a
concrete model, loss or dataset: those are plugins.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TextIO

import attrs
import torch

from contsup.config.early_stop import stop_reason
from contsup.core.version import __version__
from contsup.errors import BatchError, ContsupError, UnreadableData, one_line, reason
from contsup.model.network import Built, GreedyNetwork, build_network
from contsup.training.checkpoint import FORMAT as CHECKPOINT_FORMAT
from contsup.training.checkpoint import (
    checkpoint_dir, checkpoint_name, checkpoint_paths, rng_state, save_checkpoint, set_rng_state,
)
from contsup.training.checkpoint import describe as describe_checkpoint
from contsup.training.device import peak_memory, resolve_device, seed_everything
from contsup.training.evaluation import Evaluation
from contsup.training.failures import Interrupted, NonFiniteLoss, OutOfMemory, TrainingFailed, stop_signals, stopped
from contsup.training.parallel import Gathered, OneProcess, Parallel
from contsup.training.precision import Precision, apply_device_options, check_precision
from contsup.training.progress import Progress
from contsup.training.rundir import METRICS_FILE, forget_metrics, refused_writes, save_model, write_classes
from contsup.training.strategies import StepStats, Strategy, make_strategy

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


@attrs.define
class EpochProgress:
    """Where one epoch stands: what a mid-epoch checkpoint records and a resumed epoch continues."""

    epoch: int
    start_state: torch.Tensor  # the loader generator's state when the epoch began: fixes its order
    stats: StepStats
    done: int = 0  # batches trained
    images: int = 0
    elapsed_s: float = 0.0  # training time before ``restart_clock``
    _t0: float = 0.0

    def restart_clock(self) -> None:
        self._t0 = time.perf_counter()

    def elapsed(self) -> float:
        return self.elapsed_s + time.perf_counter() - self._t0


class Trainer:
    """One run of a recipe: builds everything, trains for ``run.epochs``, evaluates every epoch.

    With ``checkpoints`` on (the default) it writes a checkpoint into ``run_dir/checkpoints`` at
    the end of every epoch and every ``run.checkpoint_every_steps`` steps; ``load_state`` resumes
    from one exactly. Ctrl-C during ``fit`` stops after the current step with a checkpoint.
    ``parallel`` is this process's part in the run (default: the whole run, in this process).
    """

    def __init__(
        self, recipe: Recipe, run_dir: Path, hook: Any = None, log: TextIO | None = None, checkpoints: bool = True,
        parallel: Parallel | None = None,
    ) -> None:
        self.parallel: Parallel = parallel or OneProcess()
        main = self.parallel.is_main
        quiet = None if main else open(os.devnull, "w")
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.hook = hook if main else None
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
        self.train_loader, self.test_loader, self.train_size = self.parallel.loaders(recipe, self.dataset, self.device)
        self.steps_per_epoch = len(self.train_loader)
        if main and hasattr(self.dataset, "classes") and self.run_dir.is_dir():
            write_classes(self.run_dir, self.dataset.classes())  # the dataset names its classes: classes.json
        self.strategy: Strategy = make_strategy(
            recipe, self.network, self.steps_per_epoch, self.precision, sync=self.parallel.sync_gradients
        )
        self.info = RunInfo(recipe, self.run_dir, self.network, self.built.plans, self.device)
        self.history: list[dict] = []
        self.checkpoints = checkpoints
        self.last_checkpoint: tuple[Path, str, tuple[int, int]] | None = None  # path, where, (step, epochs done)
        self.current: EpochProgress | None = None
        self._resumed: EpochProgress | None = None
        self._stop_wanted_at: float | None = None  # when the first Ctrl-C (or SIGTERM) arrived
        self._stop_agreed = False  # every process stops after this step
        self._stopped_by = "Ctrl-C"  # or "SIGTERM", "SIGHUP": what asked the run to stop
        self._busy = False  # inside a step or a checkpoint write: the state is not consistent
        self.stopped_early: str | None = None  # why run.early_stop ended the run before run.epochs
        self.parallel.attach(self)

    # -- checkpoints ---------------------------------------------------------------------

    def mid_epoch(self) -> bool:
        """Whether an epoch is under way (some of its steps done, its metrics not yet recorded)."""
        return self.current is not None and self.current.epoch == len(self.history) + 1

    def checkpoint_state(self, gathered: Gathered | None = None) -> dict:
        """Everything a resumed run needs, as tensors and plain containers (``weights_only`` loads
        it); ``gathered``: what the other processes hold (:meth:`Parallel.gather`)."""
        gathered = gathered or Gathered()
        cur = self.current
        mid_epoch = self.mid_epoch()
        partial = None
        if mid_epoch:
            sums = gathered.partial or cur.stats
            partial = {
                "loss": list(sums.loss), "correct": list(sums.correct), "seen": list(sums.seen),
                "images": cur.images, "elapsed_s": cur.elapsed(),
            }
        return {
            "format": CHECKPOINT_FORMAT,
            "contsup": __version__,
            "recipe": self.recipe.table(),
            "epoch": cur.epoch if mid_epoch else len(self.history) + 1,
            "batch": cur.done if mid_epoch else 0,
            "steps_per_epoch": self.steps_per_epoch,
            "global_step": self.info.step,
            "model": self.network.state_dict(),
            "optimizers": [o.state_dict() for o in self.strategy.optimizers],
            "schedulers": [s.state_dict() for s in self.strategy.schedulers],
            "scalers": [s.state_dict() for s in self.strategy.scalers],
            "rng": rng_state(),
            "data_generator": cur.start_state if mid_epoch else self.train_loader.generator.get_state(),
            "partial": partial,
            "history": [dict(m) for m in self.history],
            **gathered.extra,
        }

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the run as it stands (between two steps); None when checkpoints are off.
        Every process calls it at the same points; the main one writes. Parameters that became
        non-finite stop the run instead, keeping the last good checkpoint."""
        if not self.checkpoints:
            return None
        here = (self.info.step, len(self.history))
        if self.last_checkpoint is not None and self.last_checkpoint[2] == here:
            return self.last_checkpoint[0]  # nothing changed since
        gathered = self.parallel.gather(self)
        if not self.parallel.is_main:
            cur = self.current
            where = {"epoch": cur.epoch if self.mid_epoch() else len(self.history) + 1,
                     "batch": cur.done if self.mid_epoch() else 0, "steps_per_epoch": self.steps_per_epoch}
            path = checkpoint_dir(self.run_dir) / checkpoint_name(self.info.step)
            self.last_checkpoint = (path, describe_checkpoint(where), here)
            return path
        for m in self.network.blocks:
            floats = [t.detach().flatten().float() for t in m.state_dict().values() if t.is_floating_point()]
            if floats and not bool(torch.isfinite(torch.cat(floats)).all()):
                raise NonFiniteLoss(
                    f"the parameters of module {m.index} became non-finite by step {self.info.step}; "
                    f"{self._calmer()}; {self.kept()}"
                )
        self._busy = True
        state = self.checkpoint_state(gathered)
        try:
            with self.refused_writes():
                path = save_checkpoint(self.run_dir, state)
        except OSError as exc:  # anything else the file system answers (an I/O error)
            raise TrainingFailed(
                f"cannot write a checkpoint into {self.run_dir}: {exc.strerror or exc}; {self.kept()}"
            ) from None
        self._busy = False
        self.last_checkpoint = (path, describe_checkpoint(state), here)
        return path

    def load_state(self, state: dict) -> None:
        """Continue from a checkpoint (see :mod:`contsup.training.checkpoint`): weights, optimizers,
        schedules, scalers, metrics, data order, position and finally the RNG states."""
        try:
            self.network.load_state_dict(state["model"])
            parts = (
                ("optimizer", self.strategy.optimizers, state["optimizers"]),
                ("scheduler", self.strategy.schedulers, state["schedulers"]),
                ("grad scaler", self.strategy.scalers, state["scalers"]),
            )
            for what, live, saved in parts:
                if len(live) != len(saved):
                    raise ValueError(f"it has {len(saved)} {what}s, this recipe has {len(live)}")
                for obj, s in zip(live, saved):
                    obj.load_state_dict(s)
            if state["batch"] > 0 and state["steps_per_epoch"] != self.steps_per_epoch:
                raise ValueError(
                    f"it stopped inside an epoch of {state['steps_per_epoch']} steps, this recipe has "
                    f"{self.steps_per_epoch} steps per epoch"
                )
            self.train_loader.generator.set_state(state["data_generator"])
            resumed = None
            partial = state.get("partial")
            if partial is not None:
                stats = StepStats(self.network.num_modules)
                stats.loss, stats.correct, stats.seen = list(partial["loss"]), list(partial["correct"]), list(partial["seen"])
                if not len(stats.loss) == len(stats.correct) == len(stats.seen) == self.network.num_modules:
                    raise ValueError("its running sums do not have one entry per module")
                resumed = EpochProgress(
                    state["epoch"], state["data_generator"], stats, done=state["batch"],
                    images=int(partial["images"]), elapsed_s=float(partial["elapsed_s"]),
                )
            set_rng_state(state["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ContsupError(
                f"the checkpoint cannot be restored into this run ({reason(exc)}); "
                f"if the recipe changed, resume with the run's own recipe"
            ) from None
        self.history = [dict(m) for m in state["history"]]
        self.info.step = state["global_step"]
        self.info.epoch = len(self.history)
        self.parallel.restore(state, resumed)
        self._resumed = resumed

    def _calmer(self) -> str:
        """What to change when training diverges."""
        warmup = getattr(self.recipe.schedule.options, "warmup_epochs", None)
        if warmup is None:
            return "lower optimizer.lr"
        if warmup > 0:
            return f"lower optimizer.lr or lengthen schedule.warmup_epochs (now {warmup:g})"
        return "lower optimizer.lr or add schedule.warmup_epochs"

    def kept(self) -> str:
        """What is left to resume from, for failure messages."""
        if not self.checkpoints:
            return "checkpoints are off, nothing was saved"
        if self.last_checkpoint is None:
            return "no checkpoint was written yet"
        path, where, _ = self.last_checkpoint
        return f"the last good checkpoint is {path} ({where})"

    def refused_writes(self) -> contextlib.AbstractContextManager[None]:
        """A write into the run directory that the operating system refuses (a full disk) stops
        the run in one line naming the file, what is kept and that resuming finishes the run."""
        return refused_writes(self.run_dir, self._kept_after_refusal)

    def _kept_after_refusal(self) -> str:
        kept = self.kept()
        on_disk = checkpoint_paths(self.run_dir) if self.checkpoints else []
        if self.last_checkpoint is None and on_disk:  # resumed, and no checkpoint written since
            kept = f"the last good checkpoint is {on_disk[-1]}"
        safe = f"{kept}, and no half-written file replaced a complete one"
        if self.checkpoints and not on_disk and self.parallel.is_main and self.history:
            # no checkpoint holds the epochs metrics.jsonl records: a resume trains them again,
            # so they go (truncating needs no space), or the resume would take them for lost work
            forget_metrics(self.run_dir)
            safe += f" ({METRICS_FILE} was emptied: a resume trains its epochs again)"
        return safe

    # -- stopping ------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop after the current step, writing a checkpoint (what the first Ctrl-C does)."""
        if self._stop_wanted_at is None:
            self._stop_wanted_at = time.monotonic()

    def _agree_stop(self) -> bool:
        """Whether every process stops here (any of them was asked to); collective."""
        self._stop_agreed = self.parallel.agree_stop(self._stop_wanted_at is not None)
        return self._stop_agreed

    def _interrupt(self) -> Interrupted:
        """Write a checkpoint if the state is consistent (and, across processes, the stop agreed),
        then say how to continue."""
        resume = f"continue with: {self.parallel.resume_command(self.run_dir)}"
        how = "interrupted" if self._stopped_by == "Ctrl-C" else f"stopped by {self._stopped_by}"
        consistent = not self._busy and (self._stop_agreed or not self.parallel.needs_agreement)
        if consistent and self.checkpoints:
            self.save_checkpoint()
            path, where, _ = self.last_checkpoint
            exc = stopped(self._stopped_by, f"{how} at {where}; saved checkpoint {path}; {resume}")
        else:
            if self.last_checkpoint is None:
                resume += " (it starts again from the beginning)"
            exc = stopped(self._stopped_by, f"{how} in the middle of a step; {self.kept()}; {resume}")
        exc.agreed = self._stop_agreed  # every process stops here too (the main one alone says so)
        return exc

    @contextlib.contextmanager
    def _ctrl_c_stops_at_a_step(self) -> Iterator[None]:
        """The first Ctrl-C (or SIGTERM) asks to stop after the current step; a second one stops
        at once. A copy that arrives within ``parallel.signal_grace_s`` (torchrun forwards the
        terminal's Ctrl-C to processes that already got it) does not count as a second."""

        def handler(name: str) -> None:
            first = self._stop_wanted_at
            if first is not None:
                if time.monotonic() - first >= self.parallel.signal_grace_s:
                    raise KeyboardInterrupt
                return
            self._stopped_by = name
            self.request_stop()
            if self.parallel.is_main:
                again = " (press it again to stop at once)" if name == "Ctrl-C" else ""
                sys.stderr.write(f"\n{name}: stopping after this step to save a checkpoint{again}\n")
                sys.stderr.flush()

        with stop_signals(handler):
            yield

    # -- failures ------------------------------------------------------------------------

    def _check(self, epoch: int, step: int) -> Callable[[int, torch.Tensor], None]:
        def check(module: int, loss: torch.Tensor) -> None:
            if not torch.isfinite(loss.detach()).all():
                raise NonFiniteLoss(
                    f"the loss of module {module} became {float(loss.detach()):.4g} at epoch {epoch}, step {step}; "
                    f"{self._calmer()}; {self.kept()}"
                )

        return check

    def _unusable_batch(self, exc: BatchError, epoch: int, step: int) -> TrainingFailed:
        """A local loss that cannot be computed on this batch: which module, where, and what to change."""
        module = self.strategy.active_module
        d = self.recipe.data
        short = step == self.steps_per_epoch and not d.drop_last and self.train_size % d.batch_size
        remedy = (
            f"it is the epoch's last, short batch ({short} image{'s' if short > 1 else ''}): set data.drop_last = true to leave it out"
            if short else "use a larger data.batch_size"
        )
        where = f"module {module}" if module is not None else "the network"
        return TrainingFailed(f"{where} cannot train on step {step} of epoch {epoch}: {one_line(str(exc))}; {remedy}; {self.kept()}")

    def _out_of_memory(self, epoch: int, step: int, evaluating: bool) -> OutOfMemory:
        k, units = self.network.num_modules, len(self.built.unit_shapes)
        module = self.strategy.active_module
        if evaluating:
            what = f"evaluating after epoch {epoch}; lower data.test_batch_size"
        elif module is None:
            what = (
                f"training end to end at epoch {epoch}, step {step}; train greedily "
                f"(run.mode = \"greedy\", partition.modules >= 2) or lower data.batch_size"
            )
        else:
            more = f"use more modules (partition.modules = {min(2 * k, units)}), " if k < units else ""
            what = (
                f"in module {module} of {k} at epoch {epoch}, step {step}; {more}"
                f"balance the modules by memory (partition.use = \"memory_balanced\") or lower data.batch_size"
            )
        return OutOfMemory(f"the GPU ran out of memory {what}; {self.kept()}")

    @contextlib.contextmanager
    def _training_failures(self, epoch: int, cur: EpochProgress) -> Iterator[None]:
        """Training steps that run out of GPU memory, or meet a batch their local loss cannot use,
        end in one line naming the module, the epoch and the step."""
        try:
            yield
        except torch.cuda.OutOfMemoryError:
            raise self._out_of_memory(epoch, cur.done + 1, evaluating=False) from None
        except BatchError as exc:
            raise self._unusable_batch(exc, epoch, cur.done + 1) from None
        except UnreadableData as exc:
            raise self._unreadable(exc, f"reading step {cur.done + 1} of epoch {epoch}") from None

    def _unreadable(self, exc: UnreadableData, where: str) -> TrainingFailed:
        """A data file that does not decode: the dataset's line (naming the file), where, and a
        checkpoint of the run as it stands (the batch was not trained yet) to resume from."""
        if self.checkpoints and not self._busy and not self.parallel.needs_agreement:
            self.save_checkpoint()
            path, at, _ = self.last_checkpoint
            kept = f"saved checkpoint {path} ({at}); continue with: {self.parallel.resume_command(self.run_dir)}"
        else:
            kept = self.kept()
        return TrainingFailed(f"{one_line(str(exc))} ({where}); {kept}")

    # -- training ------------------------------------------------------------------------

    def _begin_epoch(self, epoch: int) -> EpochProgress:
        """Training mode and where the epoch starts: after the steps of a mid-epoch checkpoint it
        was resumed from, with their running sums, or at its first step."""
        self.network.train()
        cur = self._resumed if self._resumed is not None and self._resumed.epoch == epoch else None
        self._resumed = None
        if cur is None:
            cur = EpochProgress(epoch, self.train_loader.generator.get_state(), StepStats(self.network.num_modules))
        self.current = cur
        return cur

    def train_epoch(self, epoch: int) -> dict:
        """One epoch of training then evaluation; returns that epoch's metrics. An epoch resumed
        from a mid-epoch checkpoint continues after its last step with its running sums."""
        run, parallel = self.recipe.run, self.parallel
        cur = self._begin_epoch(epoch)
        every = run.checkpoint_every_steps
        progress = Progress(epoch, run.epochs, self.steps_per_epoch, run.log_every, stream=self.progress_stream, done=cur.done)
        parallel.begin_epoch()
        cur.restart_clock()
        with self._training_failures(epoch, cur), contextlib.closing(progress):
            for batch in parallel.batches(self.train_loader, cur, self.device, self.channels_last):
                step = cur.done + 1
                self._busy = True
                parallel.train_step(self.strategy, batch, cur.stats, self._check(epoch, step), epoch, step)
                cur.done = step
                cur.images += batch.images
                self.info.step += 1
                self._busy = False
                progress.update(cur.done, cur.stats.mean_loss())
                if every and self.info.step % every == 0 and cur.done < self.steps_per_epoch:
                    self.save_checkpoint()
                if self._agree_stop():
                    raise self._interrupt()
            parallel.end_training()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats = parallel.reduce_stats(cur.stats)
        elapsed = cur.elapsed()
        try:
            result = parallel.evaluate(self)
        except torch.cuda.OutOfMemoryError:
            raise self._out_of_memory(epoch, cur.done, evaluating=True) from None
        except UnreadableData as exc:
            raise self._unreadable(exc, f"evaluating after epoch {epoch}") from None
        parallel.record_epoch(epoch, cur.images, elapsed)
        return epoch_metrics(epoch, self.info.step, self.strategy.lr(), stats, result, cur.images, elapsed, self.device)

    def fit(self, on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
        """Train the remaining epochs; ``on_epoch`` sees each epoch's metrics (e.g. to write them)."""
        self._stop_wanted_at, self._stop_agreed = None, False
        with self._ctrl_c_stops_at_a_step():
            try:
                return self._fit(on_epoch)
            except KeyboardInterrupt:
                raise self._interrupt() from None

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
            if on_epoch is not None and self.parallel.is_main:
                with self.refused_writes():
                    on_epoch(metrics)
            self.log.write(summary_line(metrics, epochs) + "\n")
            self.log.flush()
            self.save_checkpoint()
            if self.hook is not None:
                self.hook.on_epoch_end(run=self.info, epoch=epoch, metrics=metrics)
            if epoch < epochs and self._agree_stop():
                raise self._interrupt()
        if self.hook is not None:
            self.hook.on_run_end(run=self.info, metrics=self.history[-1] if self.history else None)
        return self.history

    def _stops_early(self) -> bool:
        """Whether ``run.early_stop`` ends the run after the epochs trained so far (collective:
        every process stops when the main one does); says why on the run's log."""
        if not self.recipe.run.early_stop:
            return False
        reason = stop_reason(self.recipe.run.early_stop, self.history)
        if not self.parallel.agree_stop(reason is not None):
            return False
        self.stopped_early = reason or "the main process's metrics said so"
        self.log.write(f"early stop after epoch {len(self.history)} of {self.recipe.run.epochs}: {self.stopped_early}\n")
        self.log.flush()
        return True

    def finish(self) -> None:
        """After ``fit``: the final weights on the main process (collective), which writes the
        model (``model.pt``) and what this kind of run records besides."""
        self.parallel.gather(self)  # the main process's network now holds every module's weights
        if self.parallel.is_main:
            with self.refused_writes():
                save_model(self.run_dir, self.network)
        self.parallel.finish(self.run_dir)


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


__all__ = ["Trainer", "RunInfo", "EpochProgress", "epoch_metrics", "summary_line"]

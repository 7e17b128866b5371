"""How training stops early: failures of the run itself (exit 1), and stops asked for by a
person, a scheduler or a closed terminal (Ctrl-C, SIGTERM, SIGHUP), which the loop takes at a step boundary."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator

from contsup.errors import BatchError, ContsupError, one_line


class TrainingFailed(ContsupError):
    """Training stopped on a problem of the run itself, not of its input: exit status 1."""

    exit_code = 1


class NonFiniteLoss(TrainingFailed):
    """A local loss (or a module's parameters) became NaN or infinite."""


class OutOfMemory(TrainingFailed):
    """The GPU ran out of memory."""


class Interrupted(ContsupError):
    """Stopped on request (Ctrl-C: exit status 130, SIGTERM from a scheduler: 143, SIGHUP from a
    closed terminal: 129); the message says
    which checkpoint to resume from. ``agreed``: every process stopped at the same step."""

    exit_code = 130
    label = "stopped"
    agreed = False


# what stops a run at the next step: name and exit status (128 + the signal's number). SIGHUP
# is what a closed terminal (or an ssh session that drops) sends.
STOP_SIGNALS = {
    signal.SIGINT: ("Ctrl-C", 130), signal.SIGTERM: ("SIGTERM", 143), signal.SIGHUP: ("SIGHUP", 129),
}


def stopped(name: str, *lines: str) -> Interrupted:
    """The Interrupted error for a stop asked by ``name`` ("Ctrl-C", "SIGTERM" or "SIGHUP"), with its exit status."""
    exc = Interrupted(*lines)
    exc.exit_code = dict(STOP_SIGNALS.values()).get(name, Interrupted.exit_code)
    return exc


@contextlib.contextmanager
def stop_signals(handler: Callable[[str], None]) -> Iterator[None]:
    """Route Ctrl-C, SIGTERM (what a cluster scheduler sends before it kills a job) and SIGHUP to
    ``handler(name)`` while training, in the main thread; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        signum: signal.signal(signum, lambda _signum, _frame, name=name: handler(name))
        for signum, (name, _code) in STOP_SIGNALS.items()
    }
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)


# -- what each failure says ---------------------------------------------------------------------


def calmer(recipe: Any) -> str:
    """What to change when training diverges."""
    warmup = getattr(recipe.schedule.options, "warmup_epochs", None)
    if warmup is None:
        return "lower optimizer.lr"
    if warmup > 0:
        return f"lower optimizer.lr or lengthen schedule.warmup_epochs (now {warmup:g})"
    return "lower optimizer.lr or add schedule.warmup_epochs"


def non_finite_loss(module: int, loss: float, epoch: int, step: int, recipe: Any, kept: str) -> NonFiniteLoss:
    return NonFiniteLoss(
        f"the loss of module {module} became {loss:.4g} at epoch {epoch}, step {step}; {calmer(recipe)}; {kept}"
    )


def unusable_batch(
    exc: BatchError, module: int | None, epoch: int, step: int, last_step: bool, train_size: int, recipe: Any, kept: str,
) -> TrainingFailed:
    """A local loss that cannot be computed on this batch: which module, where, and what to change."""
    d = recipe.data
    short = last_step and not d.drop_last and train_size % d.batch_size
    remedy = (
        f"it is the epoch's last, short batch ({short} image{'s' if short > 1 else ''}): set data.drop_last = true to leave it out"
        if short else "use a larger data.batch_size"
    )
    where = f"module {module}" if module is not None else "the network"
    return TrainingFailed(f"{where} cannot train on step {step} of epoch {epoch}: {one_line(str(exc))}; {remedy}; {kept}")


def out_of_memory(
    module: int | None, k: int, units: int, epoch: int, step: int, evaluating: bool, kept: str,
) -> OutOfMemory:
    """The GPU ran out of memory: where (training module ``module`` of ``k``, end to end, or
    evaluating) and what would make it fit."""
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
    return OutOfMemory(f"the GPU ran out of memory {what}; {kept}")


__all__ = [
    "TrainingFailed", "NonFiniteLoss", "OutOfMemory", "Interrupted", "stopped", "stop_signals", "STOP_SIGNALS", "calmer",
    "non_finite_loss", "unusable_batch", "out_of_memory",
]

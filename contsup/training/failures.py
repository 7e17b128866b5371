"""How training stops early: failures of the run itself (exit 1), and stops asked for by a
person, a scheduler or a closed terminal (Ctrl-C, SIGTERM, SIGHUP), which the loop takes at a step boundary."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

from contsup.errors import ContsupError


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


__all__ = ["TrainingFailed", "NonFiniteLoss", "OutOfMemory", "Interrupted", "stopped", "stop_signals", "STOP_SIGNALS"]

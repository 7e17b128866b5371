"""Stops asked for while a run trains (Ctrl-C, SIGTERM, SIGHUP): the first asks to stop after the
current step, where every process agrees to stop and a consistent checkpoint can be written; a
second stops at once."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator

from contsup.training.checkpointer import Checkpointer
from contsup.training.failures import Interrupted, stop_signals, stopped
from contsup.training.processes import Processes


class StopRequests:
    """Whether a stop was asked for, by what, and whether every process agreed to it."""

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self.wanted_at: float | None = None  # when the first Ctrl-C (or SIGTERM) arrived
        self.agreed = False  # every process stops after this step
        self.by = "Ctrl-C"  # or "SIGTERM", "SIGHUP": what asked the run to stop

    def reset(self) -> None:
        self.wanted_at, self.agreed = None, False

    def request(self) -> None:
        """Stop after the current step, writing a checkpoint (what the first Ctrl-C does)."""
        if self.wanted_at is None:
            self.wanted_at = time.monotonic()

    def agree(self) -> bool:
        """Whether every process stops here (any of them was asked to); collective."""
        self.agreed = self.processes.any_rank(self.wanted_at is not None)
        return self.agreed

    @contextlib.contextmanager
    def from_signals(self) -> Iterator[None]:
        """The first Ctrl-C (or SIGTERM) asks to stop after the current step; a second one stops
        at once. A copy that arrives within ``signal_grace_s`` (torchrun forwards the terminal's
        Ctrl-C to processes that already got it) does not count as a second."""

        def handler(name: str) -> None:
            first = self.wanted_at
            if first is not None:
                if time.monotonic() - first >= self.processes.signal_grace_s:
                    raise KeyboardInterrupt
                return
            self.by = name
            self.request()
            if self.processes.is_main:
                again = " (press it again to stop at once)" if name == "Ctrl-C" else ""
                sys.stderr.write(f"\n{name}: stopping after this step to save a checkpoint{again}\n")
                sys.stderr.flush()

        with stop_signals(handler):
            yield

    def interrupted(self, consistent: bool, checkpointer: Checkpointer, save: Callable[[], object], resume: str) -> Interrupted:
        """The error that ends a stopped run: with a checkpoint written by ``save()`` when the
        state is ``consistent`` (and, across processes, the stop agreed), else what the
        ``checkpointer`` says is left; and how to continue."""
        resume = f"continue with: {resume}"
        how = "interrupted" if self.by == "Ctrl-C" else f"stopped by {self.by}"
        if consistent and checkpointer.enabled and (self.agreed or not self.processes.needs_agreement):
            save()
            path, where, _ = checkpointer.last
            exc = stopped(self.by, f"{how} at {where}; saved checkpoint {path}; {resume}")
        else:
            if checkpointer.last is None:
                resume += " (it starts again from the beginning)"
            exc = stopped(self.by, f"{how} in the middle of a step; {checkpointer.describe_kept()}; {resume}")
        exc.agreed = self.agreed  # every process stops here too (the main one alone says so)
        return exc


__all__ = ["StopRequests"]

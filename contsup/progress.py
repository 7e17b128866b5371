"""Progress on long work: a live line on a terminal, plain periodic lines in logs."""

from __future__ import annotations

import sys
import time
from typing import Sequence, TextIO


def _fmt_losses(losses: Sequence[float | None]) -> str:
    shown = [f"{v:.3f}" if v is not None else "-" for v in losses]
    if len(shown) > 8:
        shown = shown[:3] + ["..."] + shown[-3:]
    return " ".join(shown)


class Progress:
    """Reports steps of one epoch (``done`` of them finished before, in a resumed epoch). On a
    terminal the line is redrawn at most 10 times a second; otherwise a line is printed every
    ``every`` steps, or, when ``every`` is 0, at most every ``quiet_s`` seconds so that short
    epochs do not flood a log."""

    def __init__(
        self, epoch: int, epochs: int, steps: int, every: int = 0, stream: TextIO | None = None, quiet_s: float = 10.0,
        done: int = 0,
    ) -> None:
        self.stream = stream or sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self.fixed = every > 0
        self.every = every or max(1, steps // 10)
        self.quiet_s = quiet_s
        self.done = done  # steps finished before this process took over (a resumed epoch)
        self.start = time.perf_counter()
        self._last_draw = self.start

    def update(self, step: int, losses: Sequence[float | None]) -> None:
        """Called after 1-based ``step`` with each module's running loss."""
        now = time.perf_counter()
        elapsed = now - self.start
        ran = step - self.done
        eta = elapsed / ran * (self.steps - step) if ran > 0 else 0.0
        text = (
            f"epoch {self.epoch}/{self.epochs} step {step}/{self.steps} "
            f"[{elapsed:5.1f}s, eta {eta:5.1f}s] loss per module: {_fmt_losses(losses)}"
        )
        if self.live:
            if now - self._last_draw >= 0.1 or step == self.steps:
                self.stream.write("\r\033[K" + text)
                self.stream.flush()
                self._last_draw = now
        elif step % self.every == 0 and (self.fixed or now - self._last_draw >= self.quiet_s):
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_draw = now

    def close(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()

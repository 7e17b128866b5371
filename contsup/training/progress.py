"""Progress on long work: a tqdm bar on a terminal, plain periodic lines in logs."""

from __future__ import annotations

import io
import os
import sys
import time
from typing import Sequence, TextIO

from tqdm import tqdm


def _fmt_losses(losses: Sequence[float | None]) -> str:
    shown = [f"{v:.3f}" if v is not None else "-" for v in losses]
    if len(shown) > 8:
        shown = shown[:3] + ["..."] + shown[-3:]
    return " ".join(shown)


def _sized(stream: TextIO) -> bool:
    """Whether the terminal reports its width (a pseudo-terminal may say 0 columns)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


class Progress:
    """Reports steps of one epoch (``done`` of them finished before, in a resumed epoch). On a
    terminal a progress bar (steps, rate, time left, each module's running loss) is redrawn at
    most 10 times a second and removed at the end of the epoch; otherwise a line is printed every
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
        self.bar = None
        if self.live:
            self.bar = tqdm(
                total=steps, initial=done, desc=f"epoch {epoch}/{epochs}", unit="step", file=self.stream,
                leave=False, mininterval=0.1, **({"dynamic_ncols": True} if _sized(self.stream) else {"ncols": 100, "nrows": 24}),
            )

    def update(self, step: int, losses: Sequence[float | None]) -> None:
        """Called after 1-based ``step`` with each module's running loss."""
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {_fmt_losses(losses)}", refresh=False)
            self.bar.update(step - self.bar.n)
            return
        now = time.perf_counter()
        elapsed = now - self.start
        ran = step - self.done
        eta = elapsed / ran * (self.steps - step) if ran > 0 else 0.0
        text = (
            f"epoch {self.epoch}/{self.epochs} step {step}/{self.steps} "
            f"[{elapsed:5.1f}s, eta {eta:5.1f}s] loss per module: {_fmt_losses(losses)}"
        )
        if step % self.every == 0 and (self.fixed or now - self._last_draw >= self.quiet_s):
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_draw = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

"""Early stopping: ``run.early_stop = {metric = "test_error_pct", patience = 3}`` ends a run as
finished once the metric has gone ``patience`` epochs without improving on its best by more than
``min_delta``.

The decision is a pure function of the epochs' metrics (metrics.jsonl's lines), so it is the same
for an uninterrupted run and a resumed one, and a resumed run that had stopped early stops again
at once, training nothing. Nothing here imports torch.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Mapping, Sequence

import attrs

from contsup.suggest import did_you_mean

# metric -> the direction that is better; a per-module list counts by its last entry, the
# network's own output (module K's head)
METRICS: dict[str, str] = {
    "test_error_pct": "min",
    "test_loss": "min",
    "test_local_acc_pct": "max",
    "train_loss": "min",
    "train_acc_pct": "max",
}
KEYS = ("metric", "patience", "min_delta", "mode")


@attrs.frozen
class EarlyStop:
    """The rule: stop when ``metric`` has not improved on its best by more than ``min_delta`` for
    ``patience`` epochs; ``mode`` "min" or "max" says which way is better."""

    metric: str
    patience: int
    min_delta: float = 0.0
    mode: Literal["min", "max"] = "min"

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> "EarlyStop | None":
        """The rule of ``run.early_stop`` (None for ``{}``: never stop early); ValueError with a
        message naming the key for anything else."""
        if not table:
            return None
        for key in table:
            if key not in KEYS:
                raise ValueError(f"unknown key '{key}'; {did_you_mean(key, KEYS)}")
        metric = table.get("metric")
        if not isinstance(metric, str):
            raise ValueError(f'metric: give the metric to watch, one of {", ".join(METRICS)} (e.g. metric = "test_error_pct")')
        if metric not in METRICS:
            raise ValueError(f"metric: '{metric}' is not a metric it can watch; {did_you_mean(metric, METRICS)}")
        patience = table.get("patience")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience: the epochs without improvement before stopping, an integer >= 1, got {patience!r}")
        min_delta = table.get("min_delta", 0.0)
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not 0 <= min_delta < math.inf:
            raise ValueError(f"min_delta: the smallest change that counts as an improvement, a number >= 0, got {min_delta!r}")
        mode = table.get("mode", "auto")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f'mode: "auto" (lower is better for errors and losses, higher for accuracies), "min" or "max", got {mode!r}')
        return cls(metric, patience, float(min_delta), METRICS[metric] if mode == "auto" else mode)

    def value(self, metrics: Mapping[str, Any]) -> float | None:
        """The watched value of one epoch (a list's last entry), None where it is missing."""
        value = metrics.get(self.metric)
        if isinstance(value, (list, tuple)):
            value = value[-1] if value else None
        return None if value is None or not math.isfinite(value) else float(value)

    def better(self, value: float, best: float) -> bool:
        return value < best - self.min_delta if self.mode == "min" else value > best + self.min_delta


def check_table(_instance: Any, _attribute: Any, value: Any) -> None:
    """The validator of ``run.early_stop``."""
    EarlyStop.from_table(value)


def stop_reason(table: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> str | None:
    """Why the run should stop after the epochs of ``history`` (one dict per epoch, in order),
    or None to go on: the watched metric's best epoch lies ``patience`` epochs or more back."""
    rule = EarlyStop.from_table(table)
    if rule is None or not history:
        return None
    best, best_epoch = None, 0
    for epoch, metrics in enumerate(history, start=1):
        value = rule.value(metrics)
        if value is not None and (best is None or rule.better(value, best)):
            best, best_epoch = value, epoch
    waited = len(history) - best_epoch
    if waited < rule.patience:
        return None
    by = f" by more than {rule.min_delta:g}" if rule.min_delta else ""
    seen = "no finite value yet" if best is None else f"best {best:.4g} at epoch {best_epoch}"
    return f"{rule.metric} has not improved{by} for {waited} epochs ({seen}; patience {rule.patience})"


__all__ = ["EarlyStop", "METRICS", "check_table", "stop_reason"]

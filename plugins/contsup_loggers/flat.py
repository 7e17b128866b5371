"""One epoch's metrics as flat scalars, the shape every logger records: per-module lists become
``name_1`` .. ``name_K`` (module 1 first), other values stay as they are."""

from __future__ import annotations

import json
import math
from typing import Any, Mapping


def flatten(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train_loss": [0.5, 0.4], "lr": 0.1}`` -> ``{"train_loss_1": 0.5, "train_loss_2": 0.4, "lr": 0.1}``."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value, start=1):
                out[f"{key}_{i}"] = item
        else:
            out[key] = value
    return out


def numbers(flat: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers among flat scalars (None, strings and booleans left out)."""
    return {
        k: float(v) for k, v in flat.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def flat_table(table: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A resolved recipe as ``{"optimizer.lr": "0.05", ...}`` (lists and lists of tables as JSON):
    what trackers record as a run's parameters."""
    out: dict[str, str] = {}
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_table(value, f"{path}."))
        else:
            out[path] = value if isinstance(value, str) else json.dumps(value)
    return out

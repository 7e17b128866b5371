"""Recipe presets: ``preset = "official"`` fills in the keys a recipe leaves out with a named set.

``official`` is what the authors' official code does, the code that produced the paper's
published numbers; ``paper`` is what the paper's text describes. docs/experiments.md sets them
side by side. A preset only fills in: a key the recipe (or ``--set``) gives wins, a component
table whose ``use`` names another component than the preset's gets none of the preset's keys for
it, and a key the chosen component has no option for is left out (``context.input_once`` does
not reach a selector without that option).
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

from contsup.suggest import did_you_mean

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "official": {
        "run": {"init": "official"},
        "context": {"encoder": "official", "shortcut": "official", "input_once": True},
        "schedule": {"use": "official_cosine", "warmup_epochs": 10, "start_lr": 0.01},
    },
    "paper": {
        "run": {"init": "default"},
        "context": {"encoder": "paper", "shortcut": "paper", "input_once": False},
        "schedule": {"use": "cosine", "warmup_epochs": 10.0, "final_ratio": 0.0},
    },
}

PRESET_DOCS = {
    "official": "the official code: its adapters, module 2 of RnE given x once, every convolution initialised "
    "normal(0, sqrt(2/(k*k*out))), its per-epoch warm-up blended into a cosine over all epochs",
    "paper": "the paper's text: M_E of first width h's channels, M_R without BN/ReLU, h_0^c = x also through M_R, "
    "PyTorch's initialisation of heads and adapters, per-step linear warm-up then cosine",
}


def _fill(table: Mapping[str, Any], preset: Mapping[str, Any], fields: Any) -> dict[str, Any]:
    out = dict(table)
    for key, value in preset.items():
        if key != "use" and (fields is None or key in fields):
            out.setdefault(key, copy.deepcopy(value))
    return out


def apply_preset(data: Mapping[str, Any], fields_of: Any) -> tuple[dict[str, Any], list[str]]:
    """``data`` with its ``preset`` expanded (the key removed) and the problems found.

    ``fields_of(section, use)`` gives the option names of the component a section's ``use`` (None:
    the section's default) chooses, or None when they cannot be told (an unknown name, reported by
    validation later) or the section has no components (its own keys are all filled in)."""
    out = dict(data)
    name = out.pop("preset", None)
    if name is None:
        return out, []
    if not isinstance(name, str) or name not in PRESETS:
        shown = name if isinstance(name, str) else repr(name)
        return out, [f"preset: unknown preset '{shown}'; {did_you_mean(str(name), tuple(PRESETS))}"]

    def filled(section: str, table: Any, preset: Mapping[str, Any]) -> Any:
        if table is not None and not isinstance(table, Mapping):
            return table  # not a table: validation says so
        table = dict(table or {})
        if "use" in preset:
            if table.get("use", preset["use"]) != preset["use"]:
                return table  # another component than the preset's: its keys do not apply
            table["use"] = preset["use"]
            return _fill(table, preset, None)
        fields = fields_of(section, table.get("use"))
        if fields is False:
            return table
        return _fill(table, preset, fields)

    for section, preset in PRESETS[name].items():
        out[section] = filled(section, out.get(section), preset)
        if section == "context" and isinstance(out.get("modules"), list):
            out["modules"] = [
                {**item, "context": filled(section, item["context"], preset)}
                if isinstance(item, Mapping) and isinstance(item.get("context"), Mapping) else item
                for item in out["modules"]
            ]
    return out, []


__all__ = ["PRESETS", "PRESET_DOCS", "apply_preset"]

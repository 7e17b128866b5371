"""Shared plotting conventions: headless figures, method names and one colour per method.

Figures are made with ``matplotlib.figure.Figure`` directly (never pyplot), so nothing here
touches the global backend and everything works without a display.
"""

from __future__ import annotations

import hashlib
import io
import json
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from contsup.config.schema import SECTIONS, TOP_LEVEL_KEYS
from contsup.training.rundir import atomic_write

CONTEXT_NONE = ("none", "R0")
# Keys that are not part of a "method": the number of modules and what does not change results.
NOT_METHOD = ("partition.modules",)
# Which keys name two methods of one short label apart first: what a reader looks for first.
TELLING_KEYS = (
    "data.use", "backbone.use", "backbone.model", "run.mode", "run.epochs", "objective.use", "decoder.use",
    "context.use", "optimizer.lr", "data.size", "data.batch_size", "run.seed",
)
# The recipe's own tables and keys: any other table in a flattened recipe is a training method's.
RECIPE_SECTIONS = frozenset(s.name for s in SECTIONS) | set(TOP_LEVEL_KEYS)
DEFAULT_HEAD = "1c2f"  # the paper's auxiliary head, left out of labels
LEGEND_WIDTH = 48  # characters per line of a legend entry; longer labels wrap


def new_figure(width: float = 7.0, height: float = 4.5, cols: int = 1) -> tuple[Any, Any]:
    """(figure, axes): a headless matplotlib figure with ``cols`` side-by-side axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    axes = fig.subplots(1, cols) if cols > 1 else fig.subplots()
    return fig, axes


def save_png(fig: Any, path: str | Path) -> Path:
    """Render ``fig`` to PNG and write it atomically; returns the path."""
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(data))
    return path


def wrap_label(label: str, width: int = LEGEND_WIDTH) -> str:
    """A legend entry broken into lines of at most ``width`` characters (at commas and spaces)."""
    return "\n".join(textwrap.wrap(label, width, break_long_words=True, break_on_hyphens=False)) or label


def legend_below(fig: Any, axes: Any, fontsize: float = 7.5) -> None:
    """One legend for the figure, outside and below its axes (constrained layout makes room),
    entries wrapped and spread over as many columns as fit the figure's width; nothing when no
    artist has a label. A legend inside the axes hides points, one wider than the figure is cut off."""
    handles, labels = [], []
    for ax in axes if isinstance(axes, (list, tuple)) else [axes]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if not labels:
        return
    wrapped = [wrap_label(lab) for lab in labels]
    widest = max(len(line) for lab in wrapped for line in lab.splitlines())
    # about 0.06 inch per character at this font size, plus the marker and the gap
    per_column = 0.6 + widest * 0.06 * fontsize / 7.5
    columns = max(1, min(len(labels), int(fig.get_figwidth() // per_column)))
    fig.legend(handles, wrapped, loc="outside lower center", ncols=columns, fontsize=fontsize, frameon=False)


def short_name(index: int, label: str, limit: int = 40) -> str:
    """A short, unique file name stem for the ``index``-th figure of its kind: the index, a few
    characters of the label and a hash of the whole label (``03-ContSup-R1E-K4-1a2b3c``)."""
    digest = hashlib.sha1(label.encode("utf-8")).hexdigest()[:6]
    return f"{index:02d}-{slug(label)[:limit].strip('-.')}-{digest}"


def _stage_label(stage: Mapping[str, Any]) -> str:
    context = (stage.get("context") or {}).get("use", "")
    first, last = stage.get("range", ["?", "?"])
    name = "DGL" if context in CONTEXT_NONE else context or "?"
    return f"{name}[{first}-{last}]"


def _context_name(config: Mapping[str, Any]) -> str:
    """The shorthand (``M1R1E``, ``all``, ``none``) of the ``contsup`` selector's options."""
    if config.get("context.dense"):
        return "all" if config.get("context.input") else "dense"
    m, r = int(config.get("context.intermediate") or 0), int(config.get("context.recent") or 0)
    name = (f"M{m}" if m else "") + (f"R{r}" if r else "") + ("E" if config.get("context.input") else "")
    return name or "none"


def method_label(config: Mapping[str, Any]) -> str:
    """A short human name for a flattened recipe (``{"context.use": "R1E", ...}``) without K:
    ``DGL``, ``ContSup R1E``, ``E2E``, with the objective and decoder when not the defaults."""
    if config.get("run.mode") == "e2e":
        base = "E2E"
    elif config.get("modules"):
        stages = config["modules"]
        stages = json.loads(stages) if isinstance(stages, str) else stages
        base = "hybrid " + "+".join(_stage_label(s) for s in stages)
    else:
        context = config.get("context.use", "none")
        if context == "contsup":
            context = _context_name(config)
        base = "DGL" if context in CONTEXT_NONE else f"ContSup {context}"
    if config.get("run.mode") == "e2e":
        return base
    objective = config.get("objective.use")
    if objective and objective != "cross_entropy":
        base += f" · {objective}"
    head = config.get("objective.head")
    if head and head != DEFAULT_HEAD:
        base += f" · {head} head"
    decoder = config.get("decoder.use")
    if decoder:
        base += f" + {decoder}"
    return base + "".join(f" + {name}" for name in training_methods(config))


def training_methods(config: Mapping[str, Any]) -> list[str]:
    """The training methods a flattened recipe turns on: its tables beyond the recipe's own
    sections, unless every value in one is 0 or false (``backlink.units = 0`` is plain greedy)."""
    tables: dict[str, list[Any]] = {}
    for key, value in config.items():
        name = key.split(".", 1)[0]
        if "." in key and name not in RECIPE_SECTIONS:
            tables.setdefault(name, []).append(value)
    return sorted(name for name, values in tables.items() if any(v not in (0, False, None) for v in values))


def method_key(config: Mapping[str, Any]) -> str:
    """The configuration minus K (seed and bookkeeping keys are already left out of ``config``)."""
    return json.dumps({k: v for k, v in config.items() if k not in NOT_METHOD}, sort_keys=True, default=str)


def telling_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Few keys whose values tell ``configs`` apart as well as all their keys do: greedily the
    key that tells most groups apart, ties to the keys readers look for first
    (:data:`TELLING_KEYS`); returned in that order."""

    def rank(key: str) -> tuple[int, str]:
        return (TELLING_KEYS.index(key) if key in TELLING_KEYS else len(TELLING_KEYS), key)

    def groups(keys: Sequence[str]) -> int:
        return len({json.dumps([config.get(k) for k in keys], default=str) for config in configs})

    all_keys = sorted({k for c in configs for k in c}, key=rank)
    varying = [k for k in all_keys if groups([k]) > 1]
    target, chosen = groups(varying), []
    while groups(chosen) < target:
        best = max(varying, key=lambda k: (groups([*chosen, k]), -rank(k)[0]))  # first of equals: the earliest
        chosen.append(best)
        varying.remove(best)
    return sorted(chosen, key=rank)


def method_labels(configs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """{method key: label}; methods whose short labels collide get the values of the fewest keys
    that tell them apart (``ContSup R1E (data.use=digits)``)."""
    methods: dict[str, dict[str, Any]] = {}
    for config in configs:
        methods.setdefault(method_key(config), {k: v for k, v in config.items() if k not in NOT_METHOD})
    by_label: dict[str, list[str]] = {}
    for key, config in methods.items():
        by_label.setdefault(method_label(config), []).append(key)
    out: dict[str, str] = {}
    for label, keys in by_label.items():
        if len(keys) == 1:
            out[keys[0]] = label
            continue
        varying = telling_keys([methods[key] for key in keys])
        for key in keys:
            extra = ", ".join(f"{k}={_short_value(methods[key].get(k))}" for k in varying)
            out[key] = f"{label} ({extra})"
    return out


def _short_value(value: Any, limit: int = 24) -> str:
    """A value as a label shows it: a long path by its last part."""
    text = str(value)
    if len(text) > limit and "/" in text:
        text = ".../" + text.rstrip("/").rsplit("/", 1)[-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


# The paper's methods keep one colour in every figure (report, probe); others take the rest in turn.
METHOD_COLOURS = {
    "E2E": "tab:gray", "DGL": "tab:blue", "ContSup E": "tab:green", "ContSup R1E": "tab:orange",
    "ContSup M1R1E": "tab:red", "ContSup M2R1E": "tab:purple",
}


def colours(labels: Iterable[str], method: Callable[[str], str] = lambda label: label) -> dict[str, Any]:
    """One colour per label. When each label is a different method (``method(label)``), the
    paper's methods get their fixed colours (``METHOD_COLOURS``) and other labels the colours no
    paper method uses, in sorted order; otherwise (one method several times, e.g. at several K)
    every label takes the next tab10/tab20 colour."""
    from matplotlib import colormaps
    from matplotlib.colors import to_rgba

    unique = sorted(set(labels))
    methods = [method(label) for label in unique]
    if len(set(methods)) < len(methods):
        cmap = colormaps["tab10" if len(unique) <= 10 else "tab20"]
        return {label: to_rgba(cmap(i % cmap.N)) for i, label in enumerate(unique)}
    fixed = {label: to_rgba(METHOD_COLOURS[m]) for label, m in zip(unique, methods) if m in METHOD_COLOURS}
    rest = [label for label in unique if label not in fixed]
    reserved = {to_rgba(c) for c in METHOD_COLOURS.values()}
    cmap = colormaps["tab10" if len(rest) <= 10 - len(reserved) else "tab20"]
    free = [c for c in (to_rgba(cmap(i)) for i in range(cmap.N)) if c not in reserved]
    return {**fixed, **{label: free[i % len(free)] for i, label in enumerate(rest)}}


def slug(text: str) -> str:
    """A file-name-safe version of ``text``."""
    out = "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-") or "run"

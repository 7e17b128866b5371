"""The figures of ``contsup report``: test error per configuration, against K and against the
plan's activation memory, per-module local accuracy and training curves; and what they share with
report.md (each configuration's method and colour, each run's planned activation memory)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

import torch

from contsup.config.recipe import load_recipe
from contsup.errors import ContsupError, one_line
from contsup.model.network import build_network
from contsup.tools.plan import plan_memory
from contsup.tools.plotting import (
    colours, legend_below, method_key, method_labels, new_figure, save_png, wrap_label,
)
from contsup.tools.results import RunResult, Row
from contsup.training.rundir import RECIPE_FILE


MEMORY_KINDS = {"cuda_max_allocated": "CUDA max allocated", "cpu_peak_rss": "process peak RSS"}
MIB = 2**20


def k_of(row: Row) -> int:
    return int(row.config.get("partition.modules", 1))


def is_e2e(row: Row) -> bool:
    return row.config.get("run.mode") == "e2e"


def epochs_of(row: Row) -> int:
    return min(len(r.metrics) for r in row.runs)


class Methods:
    """Each row's method (its configuration minus K), with one label and one colour per method."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.labels = method_labels([r.config for r in rows])
        self.palette = colours(self.labels.values())

    def label(self, row: Row) -> str:
        return self.labels[method_key(row.config)]

    def colour(self, row: Row) -> Any:
        return self.palette[self.label(row)]

    def name(self, row: Row) -> str:
        """The configuration's name in figures and tables: its method and K."""
        return f"{self.label(row)}, K={k_of(row)}"

    def group(self, rows: Sequence[Row]) -> dict[str, list[Row]]:
        """{label: rows sorted by K}, labels sorted."""
        out: dict[str, list[Row]] = {}
        for row in rows:
            out.setdefault(self.label(row), []).append(row)
        return {label: sorted(out[label], key=k_of) for label in sorted(out)}


# -- the plan's activation memory ------------------------------------------------------------


class PlanMemories:
    """Per configuration, the activation memory ``contsup plan`` counts for its recipe: the
    largest module's (greedy training) or every unit's at once (end to end), at the recipe's
    batch; None with the reason where the recipe cannot be planned here (a plugin or a data
    folder missing)."""

    def __init__(self, rows: Sequence[Row], registries: Any) -> None:
        self.bytes: dict[int, int | None] = {}
        self.batch: dict[int, int] = {}
        self.problems: dict[int, str] = {}
        for row in rows:
            try:
                self.bytes[id(row)], self.batch[id(row)] = activation_memory(row.runs[0].run_dir, registries)
            except ContsupError as exc:
                self.bytes[id(row)] = None
                self.problems[id(row)] = one_line(" ".join(exc.lines))

    def mib(self, row: Row) -> float | None:
        value = self.bytes.get(id(row))
        return None if value is None else value / MIB


def activation_memory(run_dir: Path, registries: Any) -> tuple[int, int]:
    """(bytes, batch): what training the run's recipe keeps for backward at its batch, as
    ``contsup plan`` counts it (on fake tensors: nothing batch-sized is allocated)."""
    recipe = load_recipe(run_dir / RECIPE_FILE, (), registries)
    with torch.random.fork_rng(devices=[]):  # building initialises weights: leave the caller's RNG alone
        built = build_network(recipe)
    memory = plan_memory(recipe, built.network, built.plans, [p.units for p in built.plans])
    if recipe.run.mode == "greedy":
        return max(m.bytes for m in memory.modules), memory.batch
    return memory.units_bytes, memory.batch


# -- figures -------------------------------------------------------------------------------------


def plot_error_by_configuration(rows: Sequence[Row], methods: Methods, path: Path) -> Path:
    """Final test error of every configuration (mean ± std over seeds) as horizontal bars."""
    ordered = sorted(rows, key=lambda r: (methods.label(r), k_of(r)))
    fig, ax = new_figure(7.5, max(3.6, 1.4 + 0.42 * len(ordered)))
    names = [wrap_label(methods.name(r), 56) for r in ordered]
    means, stds = zip(*(r.mean_std(r.errors) for r in ordered))
    ys = range(len(ordered))
    ax.barh(ys, means, xerr=[s or 0.0 for s in stds], color=[methods.colour(r) for r in ordered], capsize=3, height=0.6)
    for y, mean, row in zip(ys, means, ordered):
        seeds = len(row.runs)
        ax.annotate(f"{mean:.2f}" + (f" ({seeds} seeds)" if seeds > 1 else ""), (mean, y), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=7)
    ax.set_yticks(list(ys), names, fontsize=7)
    ax.invert_yaxis()
    ax.margins(x=0.18)
    ax.set_xlabel("final test error (%)")
    ax.set_title("test error per configuration (mean ± std over seeds)")
    ax.grid(alpha=0.3, axis="x")
    return save_png(fig, path)


def plot_error_vs_k(rows: Sequence[Row], methods: Methods, path: Path) -> Path:
    """Test error (mean ± std over seeds) against K, one line per method; E2E as a dashed level."""
    fig, ax = new_figure(7.0, 4.8)
    ks = sorted({k_of(r) for r in rows if not is_e2e(r)}) or [1]
    for label, group in methods.group(rows).items():
        colour = methods.colour(group[0])
        if all(is_e2e(r) for r in group):
            errors = [e for r in group for e in r.errors]
            ax.axhline(statistics.fmean(errors), color=colour, linestyle="--", label=f"{label} (any K)")
            continue
        means, stds = zip(*(r.mean_std(r.errors) for r in group))
        ax.errorbar([k_of(r) for r in group], means, yerr=[s or 0.0 for s in stds], marker="o", capsize=3, color=colour, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("number of gradient-isolated modules K")
    ax.set_ylabel("test error (%)")
    ax.set_title("test error against K (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    legend_below(fig, ax)
    return save_png(fig, path)


def memory_kind(rows: Sequence[Row]) -> str:
    kinds = {m.get("memory_kind") for r in rows for run in r.runs for m in run.metrics if m.get("memory_kind")}
    if len(kinds) == 1:
        kind = kinds.pop()
        return MEMORY_KINDS.get(kind, kind)
    return "mixed kinds" if kinds else "unknown kind"


def batch_words(rows: Sequence[Row], memories: PlanMemories) -> str:
    batches = {memories.batch[id(r)] for r in rows if id(r) in memories.batch}
    return f"batch {batches.pop()}" if len(batches) == 1 else "each recipe's batch"


def plot_error_vs_memory(rows: Sequence[Row], methods: Methods, memories: PlanMemories, path: Path) -> Path:
    """Test error against the plan's activation memory, one line per method through its K
    values (Figure 4's layout)."""
    fig, ax = new_figure(7.0, 4.8)
    for label, group in methods.group(rows).items():
        points = [(memories.mib(r), r.mean_std(r.errors), k_of(r), is_e2e(r)) for r in group]
        points = sorted((p for p in points if p[0] is not None), key=lambda p: p[0])
        if not points:
            continue
        xs = [p[0] for p in points]
        ys = [p[1][0] for p in points]
        err = [p[1][1] or 0.0 for p in points]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=methods.colour(group[0]), label=label)
        for x, y, (_, _, k, e2e) in zip(xs, ys, points):
            ax.annotate("E2E" if e2e else f"K={k}", (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.margins(x=0.12, y=0.12)  # room for the K labels
    ax.set_xlabel(f"activation memory kept for backward (MiB, contsup plan, {batch_words(rows, memories)})")
    ax.set_ylabel("final test error (%)")
    ax.set_title("test error against training memory")
    ax.grid(alpha=0.3)
    legend_below(fig, ax)
    return save_png(fig, path)


def trained_modules(run: RunResult) -> list[bool]:
    """Whether each module's head was trained (end-to-end runs train only the last)."""
    k = len(run.final.get("test_local_acc_pct") or [])
    losses = [m.get("train_loss") or [None] * k for m in run.metrics]
    return [any(module[i] is not None for module in losses if i < len(module)) for i in range(k)]


def mean_series(row: Row, key: str) -> list[list[float | None]]:
    """Per epoch, per module, the mean of ``key`` over the row's runs (None where missing)."""
    out = []
    for e in range(epochs_of(row)):
        values = [r.metrics[e].get(key) or [] for r in row.runs]
        k = max(len(v) for v in values)
        out.append([mean_of([v[i] for v in values if i < len(v)]) for i in range(k)])
    return out


def mean_of(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def local_points(row: Row) -> list[tuple[int, float]]:
    """(module, final local test accuracy) of every trained module's head."""
    trained = trained_modules(row.runs[0])
    final = mean_series(row, "test_local_acc_pct")[-1]
    return [(i + 1, a) for i, a in enumerate(final) if a is not None and i < len(trained) and trained[i]]


def plot_local_accuracy(rows: Sequence[Row], methods: Methods, path: Path) -> Path:
    """The final test accuracy of every module's local head against module index, one line per
    configuration with two or more trained heads (colour = method, marker = K)."""
    fig, ax = new_figure(7.5, 4.8)
    markers = "os^Dv<>p*h"
    ks = sorted({k_of(r) for r in rows})
    for label, group in methods.group(rows).items():
        for row in group:
            pts = local_points(row)
            if len(pts) < 2:
                continue
            ax.plot(*zip(*pts), marker=markers[ks.index(k_of(row)) % len(markers)], color=methods.colour(row),
                    label=f"{label}, K={k_of(row)}", markersize=4)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("module l")
    ax.set_ylabel("test accuracy of the local head (%)")
    ax.set_title("local accuracy per module at the last epoch")
    ax.grid(alpha=0.3)
    legend_below(fig, ax)
    return save_png(fig, path)


def plot_curves(row: Row, label: str, path: Path) -> Path:
    """Per-module local training loss and test local accuracy over epochs (mean over seeds);
    for configurations trained two epochs or more."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm
    from matplotlib.ticker import MaxNLocator

    fig, (ax_l, ax_a) = new_figure(12.0, 4.5, cols=2)
    loss = mean_series(row, "train_loss")
    acc = mean_series(row, "test_local_acc_pct")
    epochs = [m["epoch"] for m in row.runs[0].metrics[: len(loss)]]
    trained = trained_modules(row.runs[0])
    k = len(trained)
    cmap = colormaps["viridis"].resampled(max(k, 1))
    norm = BoundaryNorm([i + 0.5 for i in range(k + 1)], cmap.N)
    for i in range(k):
        if not trained[i]:
            continue
        colour = cmap(norm(i + 1))
        for ax, series in ((ax_l, loss), (ax_a, acc)):
            pts = [(e, s[i]) for e, s in zip(epochs, series) if i < len(s) and s[i] is not None]
            if pts:
                ax.plot(*zip(*pts), color=colour, marker="." if len(pts) < 30 else None, linewidth=1.2)
    ax_l.set_ylabel("local training loss (epoch mean)")
    ax_a.set_ylabel("test accuracy of the local head (%)")
    for ax in (ax_l, ax_a):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax_l.set_title("local loss per module")
    ax_a.set_title("local accuracy per module")
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=[ax_l, ax_a], label="module l")
    bar.set_ticks(range(1, k + 1) if k <= 16 else range(1, k + 1, max(1, k // 8)))
    seeds = len(row.runs)
    fig.suptitle(wrap_label(f"{label}, K={k_of(row)}" + (f" (mean of {seeds} seeds)" if seeds > 1 else ""), 110))
    return save_png(fig, path)


# -- tables ----------------------------------------------------------------------------------------

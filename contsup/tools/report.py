"""Plotted reports of finished runs: test error per configuration, against K and against the
plan's activation memory, per-module local accuracy and training curves, probes and weight maps
when present, and one Markdown page embedding them beside the result tables of ``contsup results``.

Any folder of runs makes a report: figures are named by index (their full labels are in
report.md), legends sit below their axes with long entries wrapped, and a figure is drawn only
where it has something to compare (two configurations, two values of K, two epochs); what one run
or one epoch gives is a table instead. Everything is made in a hidden folder beside the output and
moved into place only once all of it is written, so a failure leaves the output as it was.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from contsup.config.recipe import load_recipe
from contsup.errors import ContsupError, one_line
from contsup.tools.plan import plan_memory
from contsup.model.network import build_network
from contsup.tools.plotting import (
    colours, legend_below, method_key, method_labels, new_figure, save_png, short_name, wrap_label,
)
from contsup.tools.results import RunResult, Row, build_rows, find_runs, load_run, markdown
from contsup.training.rundir import METRICS_FILE, RECIPE_FILE, atomic_write
from contsup.tools.probe import load_probe, plot_information
from contsup.tools.weights import load_weights, plot_weight_map

MEMORY_KINDS = {"cuda_max_allocated": "CUDA max allocated", "cpu_peak_rss": "process peak RSS"}
MIB = 2**20


def _k(row: Row) -> int:
    return int(row.config.get("partition.modules", 1))


def _is_e2e(row: Row) -> bool:
    return row.config.get("run.mode") == "e2e"


def _epochs(row: Row) -> int:
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
        return f"{self.label(row)}, K={_k(row)}"

    def group(self, rows: Sequence[Row]) -> dict[str, list[Row]]:
        """{label: rows sorted by K}, labels sorted."""
        out: dict[str, list[Row]] = {}
        for row in rows:
            out.setdefault(self.label(row), []).append(row)
        return {label: sorted(out[label], key=_k) for label in sorted(out)}


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
    ordered = sorted(rows, key=lambda r: (methods.label(r), _k(r)))
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
    ks = sorted({_k(r) for r in rows if not _is_e2e(r)}) or [1]
    for label, group in methods.group(rows).items():
        colour = methods.colour(group[0])
        if all(_is_e2e(r) for r in group):
            errors = [e for r in group for e in r.errors]
            ax.axhline(statistics.fmean(errors), color=colour, linestyle="--", label=f"{label} (any K)")
            continue
        means, stds = zip(*(r.mean_std(r.errors) for r in group))
        ax.errorbar([_k(r) for r in group], means, yerr=[s or 0.0 for s in stds], marker="o", capsize=3, color=colour, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("number of gradient-isolated modules K")
    ax.set_ylabel("test error (%)")
    ax.set_title("test error against K (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    legend_below(fig, ax)
    return save_png(fig, path)


def _memory_kind(rows: Sequence[Row]) -> str:
    kinds = {m.get("memory_kind") for r in rows for run in r.runs for m in run.metrics if m.get("memory_kind")}
    if len(kinds) == 1:
        kind = kinds.pop()
        return MEMORY_KINDS.get(kind, kind)
    return "mixed kinds" if kinds else "unknown kind"


def _batch_words(rows: Sequence[Row], memories: PlanMemories) -> str:
    batches = {memories.batch[id(r)] for r in rows if id(r) in memories.batch}
    return f"batch {batches.pop()}" if len(batches) == 1 else "each recipe's batch"


def plot_error_vs_memory(rows: Sequence[Row], methods: Methods, memories: PlanMemories, path: Path) -> Path:
    """Test error against the plan's activation memory, one line per method through its K
    values (Figure 4's layout)."""
    fig, ax = new_figure(7.0, 4.8)
    for label, group in methods.group(rows).items():
        points = [(memories.mib(r), r.mean_std(r.errors), _k(r), _is_e2e(r)) for r in group]
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
    ax.set_xlabel(f"activation memory kept for backward (MiB, contsup plan, {_batch_words(rows, memories)})")
    ax.set_ylabel("final test error (%)")
    ax.set_title("test error against training memory")
    ax.grid(alpha=0.3)
    legend_below(fig, ax)
    return save_png(fig, path)


def _trained_modules(run: RunResult) -> list[bool]:
    """Whether each module's head was trained (end-to-end runs train only the last)."""
    k = len(run.final.get("test_local_acc_pct") or [])
    losses = [m.get("train_loss") or [None] * k for m in run.metrics]
    return [any(l[i] is not None for l in losses if i < len(l)) for i in range(k)]


def _mean_series(row: Row, key: str) -> list[list[float | None]]:
    """Per epoch, per module, the mean of ``key`` over the row's runs (None where missing)."""
    out = []
    for e in range(_epochs(row)):
        values = [r.metrics[e].get(key) or [] for r in row.runs]
        k = max(len(v) for v in values)
        out.append([_mean([v[i] for v in values if i < len(v)]) for i in range(k)])
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _local_points(row: Row) -> list[tuple[int, float]]:
    """(module, final local test accuracy) of every trained module's head."""
    trained = _trained_modules(row.runs[0])
    final = _mean_series(row, "test_local_acc_pct")[-1]
    return [(i + 1, a) for i, a in enumerate(final) if a is not None and i < len(trained) and trained[i]]


def plot_local_accuracy(rows: Sequence[Row], methods: Methods, path: Path) -> Path:
    """The final test accuracy of every module's local head against module index, one line per
    configuration with two or more trained heads (colour = method, marker = K)."""
    fig, ax = new_figure(7.5, 4.8)
    markers = "os^Dv<>p*h"
    ks = sorted({_k(r) for r in rows})
    for label, group in methods.group(rows).items():
        for row in group:
            pts = _local_points(row)
            if len(pts) < 2:
                continue
            ax.plot(*zip(*pts), marker=markers[ks.index(_k(row)) % len(markers)], color=methods.colour(row),
                    label=f"{label}, K={_k(row)}", markersize=4)
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
    loss = _mean_series(row, "train_loss")
    acc = _mean_series(row, "test_local_acc_pct")
    epochs = [m["epoch"] for m in row.runs[0].metrics[: len(loss)]]
    trained = _trained_modules(row.runs[0])
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
    fig.suptitle(wrap_label(f"{label}, K={_k(row)}" + (f" (mean of {seeds} seeds)" if seeds > 1 else ""), 110))
    return save_png(fig, path)


# -- tables ----------------------------------------------------------------------------------------


def _cell(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _pipes(text: str) -> str:
    return text.replace("|", "\\|")


def configurations_table(rows: Sequence[Row], methods: Methods, memories: PlanMemories, curves: dict[int, str]) -> list[str]:
    """One line per configuration: its name in the figures, K, epochs, runs, memory (the plan's
    and the measured peak) and its curves' file."""
    lines = [
        "| configuration (as in the figures) | K | epochs | runs | test error % | activation memory MiB (plan) "
        "| measured peak MiB | curves |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        mean, std = row.mean_std(row.errors)
        error = _cell(mean) + (f" ± {std:.2f}" if std is not None else "")
        plan = _cell(memories.mib(row), ".1f") if id(row) not in memories.problems else "-"
        curve = f"[{curves[id(row)]}]({curves[id(row)]})" if id(row) in curves else "table below"
        dirs = ", ".join(f"`{r.run_dir}`" for r in row.runs)
        lines.append(
            f"| {_pipes(methods.name(row))} | {_k(row)} | {_epochs(row)} | {dirs} | {error} | {plan} "
            f"| {_cell(row.memory_mib(), '.0f')} | {curve} |"
        )
    return lines


def one_epoch_table(row: Row) -> list[str]:
    """Per module, the local training loss, training accuracy and test accuracy of a
    configuration trained one epoch (mean over seeds): what its curves would show as dots."""
    loss = _mean_series(row, "train_loss")[-1]
    train_acc = _mean_series(row, "train_acc_pct")[-1]
    acc = _mean_series(row, "test_local_acc_pct")[-1]
    lines = ["| module | local training loss | training accuracy % | test accuracy of its head % |",
             "| --- | --- | --- | --- |"]
    for i in range(len(acc)):
        value = lambda series: series[i] if i < len(series) else None  # noqa: E731
        lines.append(f"| {i + 1} | {_cell(value(loss), '.4f')} | {_cell(value(train_acc))} | {_cell(value(acc))} |")
    return lines


# -- the report ------------------------------------------------------------------------------------


def _staging(out: Path) -> Path:
    """An empty hidden folder beside ``out`` (same file system: moving out of it is a rename)."""
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))


FIGURE_NAMES = ("error_by_configuration.png", "error_vs_k.png", "error_vs_memory.png", "local_accuracy.png", "information.png")
FIGURE_FOLDERS = ("curves", "weights")


def _move_into(staging: Path, out: Path, files: Sequence[Path]) -> None:
    """Every file made in ``staging`` into the same place under ``out``, report.md last, each by
    one rename (a reader sees the old file or the new one); then the figures an earlier report
    left there and this one did not make are removed, so the folder holds this report alone."""
    for rel in files:
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, target)
    made = {rel.as_posix() for rel in files}
    stale = [out / name for name in FIGURE_NAMES if name not in made]
    stale += [p for folder in FIGURE_FOLDERS for p in (out / folder).glob("*.png")
              if p.relative_to(out).as_posix() not in made]
    for path in stale:
        if path.is_file():
            path.unlink()


def write_report(paths: Sequence[str], out_dir: str | Path, registries: Any, command: str = "") -> tuple[Path, list[Path]]:
    """Every figure and the Markdown page for the finished runs under ``paths``; returns the
    page and the figures. Nothing under ``out_dir`` changes unless all of them were written."""
    run_dirs = find_runs(paths)
    if not run_dirs:
        raise ContsupError(f"no run directories (with {RECIPE_FILE} and {METRICS_FILE}) under {', '.join(map(str, paths))}")
    columns, rows, unfinished = build_rows([load_run(d) for d in run_dirs], registries)
    if not rows:
        raise ContsupError(f"no finished runs under {', '.join(map(str, paths))} ({len(unfinished)} unfinished)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ContsupError(f"contsup report: -o {out} is a file; give a folder for report.md and its figures")
    staging = _staging(out)
    try:
        made = _compose(paths, rows, columns, unfinished, registries, command, staging)
        _move_into(staging, out, made)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / "report.md", [out / rel for rel in made if rel.name != "report.md"]


def _compose(
    paths: Sequence[str], rows: list[Row], columns: list[str], unfinished: list[RunResult], registries: Any,
    command: str, out: Path,
) -> list[Path]:
    """Write the figures and report.md into ``out``; returns their paths relative to it, report.md last."""
    methods = Methods(rows)
    memories = PlanMemories(rows, registries)
    figures: list[tuple[str, str, str]] = []  # (heading, file relative to out, caption)
    notes: list[str] = []  # what was left out, and why

    def add(heading: str, draw: Callable[[Path], Path], rel: str, caption: str) -> None:
        figures.append((heading, draw(out / rel).relative_to(out).as_posix(), caption))

    if len(rows) >= 2:
        add("Test error per configuration", lambda p: plot_error_by_configuration(rows, methods, p),
            "error_by_configuration.png", "Final-epoch test error, mean ± std over seeds.")
    if any(len({_k(r) for r in group if not _is_e2e(r)}) >= 2 for group in methods.group(rows).values()):
        add("Test error against K", lambda p: plot_error_vs_k(rows, methods, p), "error_vs_k.png",
            "Final-epoch test error, mean ± std over seeds, one line per method.")
    else:
        notes.append("no figure of test error against K: no method was trained greedily at two values of K")
    planned = [r for r in rows if memories.mib(r) is not None]
    if len(planned) >= 2:
        add("Test error against training memory", lambda p: plot_error_vs_memory(rows, methods, memories, p),
            "error_vs_memory.png",
            "Each point is one configuration (one K of a method); memory is the activation memory kept for "
            "backward as `contsup plan` counts it: the largest module's for greedy training, every unit's at "
            "once end to end.")
    else:
        notes.append("no figure of test error against memory: fewer than two configurations could be planned")
    if any(len(_local_points(r)) >= 2 for r in rows):
        add("Local accuracy per module", lambda p: plot_local_accuracy(rows, methods, p), "local_accuracy.png",
            "Test accuracy of each module's own head at the last epoch (configurations with two or more heads trained).")
    curves: dict[int, str] = {}
    single: list[Row] = []
    for i, row in enumerate(rows, start=1):
        if _epochs(row) < 2:
            single.append(row)
            continue
        name = methods.name(row)
        rel = f"curves/{short_name(i, name)}.png"
        curves[id(row)] = rel
        add(f"Training curves: {name}", lambda p, row=row: plot_curves(row, methods.label(row), p), rel,
            "Runs: " + ", ".join(f"`{r.run_dir}`" for r in row.runs))
    probes = []
    for row in rows:
        for run in row.runs:
            data = load_probe(run.run_dir)
            if data is not None:
                probes.append((data.get("label") or str(run.run_dir), methods.colour(row), data))
    if probes:
        add("Task-relevant information per module", lambda p: plot_information(probes, p), "information.png",
            "I(h_l, y) estimated by `contsup probe` (H(y) minus the probe's test cross-entropy, nats).")
    index = 0
    for row in rows:
        for run in row.runs:
            data = load_weights(run.run_dir)
            if data is not None:
                index += 1
                label = str(data.get("label", run.run_dir))
                add(f"Context weights: {label}", lambda p, data=data: plot_weight_map(data, p),
                    f"weights/{short_name(index, run.run_dir.name)}.png",
                    f"From `contsup weights {run.run_dir}`: {data.get('definition', '')}.")

    lines = ["# contsup report", ""]
    lines.append(f"{sum(len(r.runs) for r in rows)} finished runs in {len(rows)} configurations from "
                 + ", ".join(f"`{p}`" for p in paths) + (f"; made by `{command}`." if command else "."))
    if unfinished:
        lines.append(f"{len(unfinished)} unfinished runs left out: " + ", ".join(f"`{r.run_dir}`" for r in unfinished) + ".")
    lines += ["", "## Results", "", markdown(columns, rows).rstrip(), ""]
    lines.append(f"Peak memory in this table is what the runs recorded ({_memory_kind(rows)}); on the CPU it is the "
                 "whole process's resident set. The figures use the activation memory of the plan instead (below).")
    lines += ["", "## Configurations", ""]
    lines += configurations_table(rows, methods, memories, curves)
    lines.append("")
    lines.append("Activation memory (plan) is what training keeps for backward at the recipe's batch size, as "
                 "`contsup plan` counts it from shapes: the largest module's for greedy training, every unit's at "
                 "once for end-to-end training. It does not depend on the machine the run trained on.")
    for row in rows:
        if id(row) in memories.problems:
            lines.append(f"No plan for {methods.name(row)}: {memories.problems[id(row)]}.")
    lines.append("")
    for note in notes:
        lines.append(f"- {note[0].upper()}{note[1:]}.")
    if notes:
        lines.append("")
    for heading, rel, caption in figures:
        lines += [f"## {heading}", "", f"![{heading}]({rel})", "", caption, ""]
    for row in single:
        lines += [f"## After one epoch: {methods.name(row)}", ""]
        lines += one_epoch_table(row)
        lines += ["", "Runs: " + ", ".join(f"`{r.run_dir}`" for r in row.runs) + " (one epoch: no curves to draw).", ""]
    text = "\n".join(lines)
    atomic_write(out / "report.md", lambda f: f.write(text), binary=False)
    return [Path(rel) for _, rel, _ in figures] + [Path("report.md")]


def report_main(paths: Sequence[str], out_dir: str, registries: Any) -> int:
    """``contsup report``: write the figures and report.md, and list them."""
    command = "contsup report " + " ".join(paths) + f" -o {out_dir}"
    page, figures = write_report(paths, out_dir, registries, command)
    print(f"wrote {page} and {len(figures)} figures under {out_dir}")
    return 0

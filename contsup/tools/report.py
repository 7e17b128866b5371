"""Plotted reports of finished runs: error against K and against peak memory per method,
per-module local accuracy and training curves, probes and weight maps when present, and one
Markdown page embedding them beside the result tables of ``contsup results``."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

from contsup.errors import ContsupError
from contsup.tools.plotting import colours, method_key, method_labels, new_figure, save_png, slug
from contsup.tools.results import RunResult, Row, build_rows, find_runs, load_run, markdown
from contsup.training.rundir import METRICS_FILE, RECIPE_FILE, atomic_write
from contsup.tools.probe import load_probe, plot_information
from contsup.tools.weights import load_weights, plot_weight_map

MEMORY_KINDS = {"cuda_max_allocated": "CUDA max allocated", "cpu_peak_rss": "process peak RSS"}


def _k(row: Row) -> int:
    return int(row.config.get("partition.modules", 1))


def _is_e2e(row: Row) -> bool:
    return row.config.get("run.mode") == "e2e"


class Methods:
    """Each row's method (its configuration minus K), with one label and one colour per method."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.labels = method_labels([r.config for r in rows])
        self.palette = colours(self.labels.values())

    def label(self, row: Row) -> str:
        return self.labels[method_key(row.config)]

    def colour(self, row: Row) -> Any:
        return self.palette[self.label(row)]

    def group(self, rows: Sequence[Row]) -> dict[str, list[Row]]:
        """{label: rows sorted by K}, labels sorted."""
        out: dict[str, list[Row]] = {}
        for row in rows:
            out.setdefault(self.label(row), []).append(row)
        return {label: sorted(out[label], key=_k) for label in sorted(out)}


def plot_error_vs_k(rows: Sequence[Row], methods: Methods, path: Path) -> Path:
    """Test error (mean ± std over seeds) against K, one line per method; E2E as a dashed level."""
    fig, ax = new_figure(7.0, 4.5)
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
    ax.legend(fontsize=8)
    return save_png(fig, path)


def _memory_kind(rows: Sequence[Row]) -> str:
    kinds = {m.get("memory_kind") for r in rows for run in r.runs for m in run.metrics if m.get("memory_kind")}
    if len(kinds) == 1:
        kind = kinds.pop()
        return MEMORY_KINDS.get(kind, kind)
    return "mixed kinds" if kinds else "unknown kind"


def plot_error_vs_memory(rows: Sequence[Row], methods: Methods, path: Path) -> Path:
    """Test error against peak memory, one line per method through its K values (Figure 4)."""
    fig, ax = new_figure(7.0, 4.5)
    for label, group in methods.group(rows).items():
        points = [(r.memory_mib(), r.mean_std(r.errors), _k(r), _is_e2e(r)) for r in group]
        points = sorted((p for p in points if p[0]), key=lambda p: p[0])
        if not points:
            continue
        xs = [p[0] for p in points]
        ys = [p[1][0] for p in points]
        err = [p[1][1] or 0.0 for p in points]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=methods.colour(group[0]), label=label)
        for x, y, (_, _, k, e2e) in zip(xs, ys, points):
            ax.annotate("E2E" if e2e else f"K={k}", (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.margins(x=0.1, y=0.1)  # room for the K labels
    ax.set_xlabel(f"peak memory (MiB, {_memory_kind(rows)})")
    ax.set_ylabel("test error (%)")
    ax.set_title("test error against peak training memory")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def _trained_modules(run: RunResult) -> list[bool]:
    """Whether each module's head was trained (end-to-end runs train only the last)."""
    k = len(run.final.get("test_local_acc_pct") or [])
    losses = [m.get("train_loss") or [None] * k for m in run.metrics]
    return [any(module[i] is not None for module in losses if i < len(module)) for i in range(k)]


def _mean_series(row: Row, key: str) -> list[list[float | None]]:
    """Per epoch, per module, the mean of ``key`` over the row's runs (None where missing)."""
    epochs = min(len(r.metrics) for r in row.runs)
    out = []
    for e in range(epochs):
        values = [r.metrics[e].get(key) or [] for r in row.runs]
        k = max(len(v) for v in values)
        out.append([_mean([v[i] for v in values if i < len(v)]) for i in range(k)])
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def plot_local_accuracy(rows: Sequence[Row], methods: Methods, path: Path) -> Path:
    """The final test accuracy of every module's local head against module index, one line per
    configuration (colour = method, marker = K)."""
    fig, ax = new_figure(7.5, 4.5)
    markers = "os^Dv<>p*h"
    ks = sorted({_k(r) for r in rows})
    for label, group in methods.group(rows).items():
        for row in group:
            trained = _trained_modules(row.runs[0])
            final = _mean_series(row, "test_local_acc_pct")[-1]
            pts = [(i + 1, a) for i, a in enumerate(final) if a is not None and i < len(trained) and trained[i]]
            if not pts:
                continue
            ax.plot(*zip(*pts), marker=markers[ks.index(_k(row)) % len(markers)], color=methods.colour(row),
                    label=f"{label}, K={_k(row)}", markersize=4)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("module l")
    ax.set_ylabel("test accuracy of the local head (%)")
    ax.set_title("local accuracy per module at the last epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_png(fig, path)


def plot_curves(row: Row, label: str, path: Path) -> Path:
    """Per-module local training loss and test local accuracy over epochs (mean over seeds)."""
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
    fig.suptitle(f"{label}, K={_k(row)}" + (f" (mean of {seeds} seeds)" if seeds > 1 else ""))
    return save_png(fig, path)


def write_report(paths: Sequence[str], out_dir: str | Path, registries: Any, command: str = "") -> tuple[Path, list[Path]]:
    """Every figure and the Markdown page for the finished runs under ``paths``; returns the
    page and the figures."""
    run_dirs = find_runs(paths)
    if not run_dirs:
        raise ContsupError(f"no run directories (with {RECIPE_FILE} and {METRICS_FILE}) under {', '.join(map(str, paths))}")
    columns, rows, unfinished = build_rows([load_run(d) for d in run_dirs], registries)
    if not rows:
        raise ContsupError(f"no finished runs under {', '.join(map(str, paths))} ({len(unfinished)} unfinished)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = Methods(rows)
    figures: list[tuple[str, str, str]] = []  # (heading, file relative to out, caption)

    def add(heading: str, path: Path, caption: str) -> None:
        figures.append((heading, path.relative_to(out).as_posix(), caption))

    add("Test error against K", plot_error_vs_k(rows, methods, out / "error_vs_k.png"),
        "Final-epoch test error, mean ± std over seeds, one line per method.")
    add("Test error against peak memory", plot_error_vs_memory(rows, methods, out / "error_vs_memory.png"),
        "Each point is one K; memory is the run's peak as recorded in metrics.jsonl (mean over seeds).")
    add("Local accuracy per module", plot_local_accuracy(rows, methods, out / "local_accuracy.png"),
        "Test accuracy of each module's own head at the last epoch.")
    used: set[str] = set()
    for row in rows:
        label = methods.label(row)
        name = slug(f"{label}-K{_k(row)}")
        while name in used:
            name += "-"
        used.add(name)
        add(f"Training curves: {label}, K={_k(row)}", plot_curves(row, label, out / "curves" / f"{name}.png"),
            "Runs: " + ", ".join(f"`{r.run_dir}`" for r in row.runs))
    probes = []
    for row in rows:
        for run in row.runs:
            data = load_probe(run.run_dir)
            if data is not None:
                probes.append((data.get("label") or str(run.run_dir), methods.colour(row), data))
    if probes:
        add("Task-relevant information per module", plot_information(probes, out / "information.png"),
            "I(h_l, y) estimated by `contsup probe` (H(y) minus the probe's test cross-entropy, nats).")
    for row in rows:
        for run in row.runs:
            data = load_weights(run.run_dir)
            if data is not None:
                name = slug(run.run_dir.name)
                while name in used:
                    name += "-"
                used.add(name)
                path = plot_weight_map(data, out / "weights" / f"{name}.png")
                add(f"Context weights: {data.get('label', run.run_dir)}", path, f"From `contsup weights {run.run_dir}`: {data.get('definition', '')}.")
    lines = ["# contsup report", ""]
    lines.append(f"{sum(len(r.runs) for r in rows)} finished runs in {len(rows)} configurations from "
                 + ", ".join(f"`{p}`" for p in paths) + (f"; made by `{command}`." if command else "."))
    if unfinished:
        lines.append(f"{len(unfinished)} unfinished runs left out: " + ", ".join(f"`{r.run_dir}`" for r in unfinished) + ".")
    lines += ["", "## Results", "", markdown(columns, rows).rstrip(), ""]
    lines.append(f"Memory is the peak recorded during training ({_memory_kind(rows)}); on the CPU it is the whole process's resident set.")
    lines.append("")
    for heading, rel, caption in figures:
        lines += [f"## {heading}", "", f"![{heading}]({rel})", "", caption, ""]
    page = out / "report.md"
    text = "\n".join(lines)
    atomic_write(page, lambda f: f.write(text), binary=False)
    return page, [out / rel for _, rel, _ in figures]


def report_main(paths: Sequence[str], out_dir: str, registries: Any) -> int:
    """``contsup report``: write the figures and report.md, and list them."""
    command = "contsup report " + " ".join(paths) + f" -o {out_dir}"
    page, figures = write_report(paths, out_dir, registries, command)
    print(f"wrote {page} and {len(figures)} figures under {out_dir}")
    return 0


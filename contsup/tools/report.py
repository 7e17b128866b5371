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
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence


from contsup.errors import ContsupError
from contsup.tools.plotting import (
    short_name,
)
from contsup.tools.results import RunResult, Row, build_rows, find_runs, load_run, markdown
from contsup.training.rundir import METRICS_FILE, RECIPE_FILE, atomic_write
from contsup.tools.probe import load_probe, plot_information
from contsup.tools.report_figures import (
    Methods, PlanMemories, epochs_of, is_e2e, k_of, local_points, mean_series, memory_kind, plot_curves,
    plot_error_by_configuration, plot_error_vs_k, plot_error_vs_memory, plot_local_accuracy,
)
from contsup.tools.weights import load_weights, plot_weight_map

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
            f"| {_pipes(methods.name(row))} | {k_of(row)} | {epochs_of(row)} | {dirs} | {error} | {plan} "
            f"| {_cell(row.memory_mib(), '.0f')} | {curve} |"
        )
    return lines


def one_epoch_table(row: Row) -> list[str]:
    """Per module, the local training loss, training accuracy and test accuracy of a
    configuration trained one epoch (mean over seeds): what its curves would show as dots."""
    loss = mean_series(row, "train_loss")[-1]
    train_acc = mean_series(row, "train_acc_pct")[-1]
    acc = mean_series(row, "test_local_acc_pct")[-1]
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
    figures, notes, curves, single = _draw(rows, methods, memories, out)
    text = _report_text(paths, rows, columns, unfinished, command, methods, memories, figures, notes, curves, single)
    atomic_write(out / "report.md", lambda f: f.write(text), binary=False)
    return [Path(rel) for _, rel, _ in figures] + [Path("report.md")]


def _draw(rows: list[Row], methods: Any, memories: Any, out: Path) -> tuple[list, list[str], dict[int, str], list[Row]]:
    """Every figure that compares something, into ``out``: (heading, file, caption) each, the notes
    on what was left out, each configuration's curves file and the one-epoch configurations."""
    figures: list[tuple[str, str, str]] = []  # (heading, file relative to out, caption)
    notes: list[str] = []  # what was left out, and why

    def add(heading: str, draw: Callable[[Path], Path], rel: str, caption: str) -> None:
        figures.append((heading, draw(out / rel).relative_to(out).as_posix(), caption))

    if len(rows) >= 2:
        add("Test error per configuration", lambda p: plot_error_by_configuration(rows, methods, p),
            "error_by_configuration.png", "Final-epoch test error, mean ± std over seeds.")
    if any(len({k_of(r) for r in group if not is_e2e(r)}) >= 2 for group in methods.group(rows).values()):
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
    if any(len(local_points(r)) >= 2 for r in rows):
        add("Local accuracy per module", lambda p: plot_local_accuracy(rows, methods, p), "local_accuracy.png",
            "Test accuracy of each module's own head at the last epoch (configurations with two or more heads trained).")
    curves: dict[int, str] = {}
    single: list[Row] = []
    for i, row in enumerate(rows, start=1):
        if epochs_of(row) < 2:
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
    return figures, notes, curves, single


def _report_text(
    paths: Sequence[str], rows: list[Row], columns: list[str], unfinished: list[RunResult], command: str, methods: Any,
    memories: Any, figures: list, notes: list[str], curves: dict[int, str], single: list[Row],
) -> str:
    """report.md: the results and configurations tables, then every figure and one-epoch table."""
    lines = ["# contsup report", ""]
    lines.append(f"{sum(len(r.runs) for r in rows)} finished runs in {len(rows)} configurations from "
                 + ", ".join(f"`{p}`" for p in paths) + (f"; made by `{command}`." if command else "."))
    if unfinished:
        lines.append(f"{len(unfinished)} unfinished runs left out: " + ", ".join(f"`{r.run_dir}`" for r in unfinished) + ".")
    lines += ["", "## Results", "", markdown(columns, rows).rstrip(), ""]
    lines.append(f"Peak memory in this table is what the runs recorded ({memory_kind(rows)}); on the CPU it is the "
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
    return "\n".join(lines)




def report_main(paths: Sequence[str], out_dir: str, registries: Any) -> int:
    """``contsup report``: write the figures and report.md, and list them."""
    command = "contsup report " + " ".join(paths) + f" -o {out_dir}"
    page, figures = write_report(paths, out_dir, registries, command)
    print(f"wrote {page} and {len(figures)} figures under {out_dir}")
    return 0

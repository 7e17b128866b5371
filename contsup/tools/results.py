"""Result tables: finished runs grouped by configuration, mean ± std over seeds, the paper's
published number beside each configuration it ran, as Markdown and CSV."""

from __future__ import annotations

import csv
import io
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import attrs

from contsup.errors import ContsupError, one_line
from contsup.tools.paper import describe, matching_cells, schedule_differences
from contsup.config.early_stop import stop_reason
from contsup.config.reading import read_toml
from contsup.core.registry import Registries
from contsup.training.rundir import METRICS_FILE, MODEL_FILE, RECIPE_FILE, atomic_write, read_metrics

# Keys that do not change what is being measured: runs differing only here are one configuration.
IGNORED = ("run.seed", "run.out_dir", "run.device", "run.log_every", "data.workers", "data.test_batch_size", "data.root", "data.download")
IGNORED_PREFIXES = ("log.", "run.checkpoint", "run.requires")
HEADLINE = ("data.use", "backbone.use", "partition.modules", "context.use", "objective.use", "decoder.use", "run.mode")


@attrs.frozen
class RunResult:
    """One run directory: its resolved recipe, its metrics, whether it finished."""

    run_dir: Path
    recipe: dict
    metrics: list[dict]
    finished: bool

    @property
    def final(self) -> dict:
        return self.metrics[-1]


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories (holding recipe.toml and metrics.jsonl) under ``paths``, sorted."""
    found: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            raise ContsupError(f"{path}: no such directory")
        candidates = [path] if (path / RECIPE_FILE).exists() else [p.parent for p in path.rglob(RECIPE_FILE)]
        found.update(c for c in candidates if (c / METRICS_FILE).exists())
    return sorted(found)


def warn_line(line: str) -> None:
    """One warning line on standard error (a damaged line of metrics.jsonl, skipped)."""
    print(f"warning: {one_line(line)}", file=sys.stderr, flush=True)


def load_run(run_dir: Path, warn: Callable[[str], None] | None = warn_line) -> RunResult:
    """One run directory's recipe and metrics; a damaged metrics line is skipped with one line through ``warn``."""
    metrics = read_metrics(run_dir, warn, warn_torn=True)
    recipe, finished = read_toml(run_dir / RECIPE_FILE), (run_dir / MODEL_FILE).exists()
    epochs = recipe.get("run", {}).get("epochs") if isinstance(recipe.get("run"), dict) else None
    early = recipe.get("run", {}).get("early_stop") if isinstance(recipe.get("run"), dict) else None
    try:  # a run that run.early_stop ended has fewer epochs by design
        stopped_early = isinstance(early, dict) and stop_reason(early, metrics) is not None
    except ValueError:
        stopped_early = False
    if finished and isinstance(epochs, int) and len(metrics) < epochs and not stopped_early and warn is not None:
        # cut at a line boundary, a shortened file parses cleanly: only the count tells
        warn(f"{run_dir / METRICS_FILE}: holds {len(metrics)} of the {epochs} epochs of a finished run "
             f"({MODEL_FILE} is written); its last figures are not the run's final ones")
    return RunResult(run_dir, recipe, metrics, finished)


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists of tables stay whole (as JSON)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{path}."))
        elif isinstance(value, list) and value and isinstance(value[0], Mapping):
            out[path] = json.dumps(value, sort_keys=True)
        else:
            out[path] = value
    return out


def _ignored(key: str) -> bool:
    return key in IGNORED or key.startswith(IGNORED_PREFIXES)


@attrs.frozen
class Row:
    """One configuration and the statistics of its runs."""

    config: dict[str, Any]
    runs: tuple[RunResult, ...]
    paper: str
    schedule: tuple[str, ...] = ()  # keys where the runs' schedule is not the paper's, beside a paper cell

    @property
    def errors(self) -> list[float]:
        """Each run's final test error (its last epoch's), in percent."""
        return [r.final["test_error_pct"] for r in self.runs]

    @property
    def best_errors(self) -> list[float]:
        """Each run's best test error (its lowest over the epochs, as the official code reports)."""
        return [min(m["test_error_pct"] for m in r.metrics) for r in self.runs]

    def errors_of(self, error: str) -> list[float]:
        """``errors`` for ``"final"``, ``best_errors`` for ``"best"``."""
        return self.best_errors if error == "best" else self.errors

    def mean_std(self, values: Sequence[float]) -> tuple[float | None, float | None]:
        values = [v for v in values if v is not None]
        if not values:
            return None, None
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)

    def memory_mib(self) -> float | None:
        peaks = [max(m.get("peak_memory_bytes") or 0 for m in r.metrics) for r in self.runs]
        return statistics.fmean(peaks) / 2**20 if peaks else None

    def images_per_s(self) -> float | None:
        rates = [m["images_per_s"] for r in self.runs for m in r.metrics if m.get("images_per_s")]
        return statistics.fmean(rates) if rates else None


def build_rows(runs: Sequence[RunResult], registries: Registries) -> tuple[list[str], list[Row], list[RunResult]]:
    """(columns that tell the configurations apart, one row per configuration, unfinished runs)."""
    finished = [r for r in runs if r.finished and r.metrics]
    unfinished = [r for r in runs if not (r.finished and r.metrics)]
    groups: dict[str, list[RunResult]] = {}
    configs: dict[str, dict[str, Any]] = {}
    for run in finished:
        config = {k: v for k, v in flatten(run.recipe).items() if not _ignored(k)}
        key = json.dumps(config, sort_keys=True, default=str)
        groups.setdefault(key, []).append(run)
        configs[key] = config
    columns = distinguishing_columns(list(configs.values()))
    rows = [paper_row(configs[key], tuple(sorted(group, key=lambda r: str(r.run_dir))), registries) for key, group in groups.items()]
    rows.sort(key=lambda row: [json.dumps(row.config.get(c), default=str) for c in columns])
    return columns, rows, unfinished


SCHEDULE_MARK = "†"


def paper_row(config: dict[str, Any], runs: tuple[RunResult, ...], registries: Registries) -> Row:
    """A configuration's row: the paper's number beside it where the paper ran the same method,
    marked with a dagger where the runs were trained with another schedule."""
    recipe = runs[0].recipe
    found = matching_cells(recipe, registries)
    schedule = tuple(schedule_differences(recipe, found[0].dataset)) if found else ()
    paper = describe(found) + (f" {SCHEDULE_MARK}" if schedule else "")
    return Row(config, runs, paper, schedule)


def distinguishing_columns(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The headline keys, then only those further keys needed to tell configurations apart
    (``context.recent`` adds nothing once ``context.use`` says ``R1E``)."""
    all_keys = sorted({k for c in configs for k in c})
    columns = [k for k in HEADLINE if k in all_keys]

    def groups(cols: Sequence[str]) -> int:
        return len({json.dumps([c.get(k) for k in cols], default=str) for c in configs})

    for key in all_keys:
        if key not in columns and groups(columns + [key]) > groups(columns):
            columns.append(key)
    return columns


def _fmt(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _value(v: Any, key: str = "", config: Mapping[str, Any] | None = None) -> str:
    if v is None:
        return "-"
    if key == "modules" and isinstance(v, str):
        return stages_summary(json.loads(v), config or {})
    return str(v)


def stages_summary(stages: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> str:
    """``[[modules]]`` entries in a few words, ``1-4: none; 5-16: R1E``: each range's context
    (and its objective or decoder where they differ from the recipe's own sections)."""
    parts = []
    for stage in stages:
        first, last = stage["range"]
        names = [stage.get("context", {}).get("use", config.get("context.use", "?"))]
        names += [stage[k]["use"] for k in ("objective", "decoder") if k in stage]
        parts.append(f"{first}-{last}: {' + '.join(names)}")
    return "; ".join(parts)


ERRORS = ("final", "best")


def markdown(columns: Sequence[str], rows: Sequence[Row], error: str | None = None) -> str:
    """The result table as Markdown: the final test error (``error = "best"``: the best over the
    epochs), its column headed by which (``None``: plain ``test error %``, the final one)."""
    label = "test error %" if error is None else f"{error} test error %"
    head = [*columns, "runs", label, "paper %", "peak memory MiB", "images/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for row in rows:
        mem, rate = row.memory_mib(), row.images_per_s()
        cells = [_value(row.config.get(c), c, row.config) for c in columns] + [
            str(len(row.runs)),
            _fmt(*row.mean_std(row.errors_of(error or "final"))),
            row.paper or "-",
            f"{mem:.0f}" if mem is not None else "-",
            f"{rate:.0f}" if rate is not None else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(columns: Sequence[str], rows: Sequence[Row]) -> str:
    """The result table as CSV, mean and std in separate columns: the final test error
    (``test_error_*``) and the best over the epochs (``best_test_error_*``), both always."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([
        *columns, "runs", "test_error_mean", "test_error_std", "paper", "peak_memory_mib", "images_per_s", "run_dirs",
        "best_test_error_mean", "best_test_error_std",
    ])
    for row in rows:
        mean, std = row.mean_std(row.errors)
        best, best_std = row.mean_std(row.best_errors)
        mem, rate = row.memory_mib(), row.images_per_s()
        writer.writerow(
            [row.config.get(c, "") for c in columns]
            + [len(row.runs), mean, "" if std is None else std, row.paper, mem, rate, " ".join(str(r.run_dir) for r in row.runs)]
            + [best, "" if best_std is None else best_std]
        )
    return buffer.getvalue()


def results_main(
    paths: Sequence[str], registries: Registries, csv_path: str | None, md_path: str | None, error: str = "final"
) -> int:
    """``contsup results``: print the Markdown table, optionally write Markdown and CSV files.
    ``error`` chooses the column: each run's final test error, or its best over the epochs."""
    if error not in ERRORS:
        raise ContsupError(f"contsup results: --error {error}: use one of {', '.join(ERRORS)}")
    run_dirs = find_runs(paths)
    if not run_dirs:
        raise ContsupError(f"no run directories (with {RECIPE_FILE} and {METRICS_FILE}) under {', '.join(paths)}")
    columns, rows, unfinished = build_rows([load_run(d) for d in run_dirs], registries)
    text = markdown(columns, rows, error)
    print(text, end="")
    notes = [
        "final test error %: each run's last epoch, mean ± std over runs (--error best: each run's lowest over its "
        "epochs, which the official code reports)" if error == "final" else
        "best test error %: each run's lowest over its epochs, as the official code reports, mean ± std over runs "
        "(--error final: each run's last epoch)"
    ]
    if any("*" in r.paper for r in rows):
        notes.append("* the paper's Table 11 R0 entry equals its Table 1 R1 value, not the R0 base; treat with care")
    differing = sorted({k for r in rows for k in r.schedule})
    if differing:
        notes.append(
            f"{SCHEDULE_MARK} run with another schedule than the paper's ({', '.join(differing)} differ); "
            "its number is for the paper's own schedule"
        )
    if unfinished:
        notes.append(f"{len(unfinished)} unfinished run(s) left out: " + ", ".join(str(r.run_dir) for r in unfinished))
    for note in notes:
        print(note, file=sys.stderr)
    if md_path:  # atomically: a full disk names the file and leaves the previous table whole
        md = text + "".join(f"\n{n}\n" for n in notes)
        atomic_write(Path(md_path), lambda f: f.write(md), binary=False)
    if csv_path:
        table = csv_text(columns, rows)
        atomic_write(Path(csv_path), lambda f: f.write(table), binary=False)
    return 0

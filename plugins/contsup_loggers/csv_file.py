"""The ``csv`` logger: every epoch as one row of ``<run dir>/metrics.csv``, one column per scalar
of its metrics.jsonl line, per-module lists flattened as ``name_1`` .. ``name_K``; empty cells
where a value is null. Rows are appended and synced as epochs end; a resumed run first drops
the rows of the epochs after its checkpoint (trained again), so every epoch has one row."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import attrs

from contsup_loggers.flat import flatten

FILE = "metrics.csv"


def _cell(value: Any) -> Any:
    return "" if value is None else value


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """The header and rows of a metrics.csv (an empty one: no header, no rows)."""
    if not path.is_file():
        return [], []
    with open(path, newline="", encoding="utf-8") as f:
        lines = list(csv.reader(f))
    return (lines[0], lines[1:]) if lines else ([], [])


def write_rows(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """The whole file, atomically: a temporary file beside it, synced, renamed over it."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class CsvLogger:
    """Every epoch's metrics as one row of <run dir>/metrics.csv: one column per scalar, per-module lists flattened as name_1..name_K."""

    name = "csv"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options: "CsvLogger.Options") -> None:
        self.options = options

    @staticmethod
    def path(run: Any) -> Path:
        return Path(run.run_dir) / FILE

    def on_run_start(self, run: Any) -> None:
        path = self.path(run)
        header, rows = read_rows(path)
        if not header:
            return
        if "epoch" not in header:
            raise ValueError(f"{path} has no epoch column: it was not written by this logger; move it away")
        at = header.index("epoch")
        kept = [row for row in rows if row[at:at + 1] and row[at].isdigit() and int(row[at]) <= run.epoch]
        if len(kept) != len(rows):  # resumed: the epochs after the checkpoint are trained again
            write_rows(path, header, kept)

    def on_epoch_end(self, run: Any, epoch: int, metrics: dict) -> None:
        path = self.path(run)
        flat = flatten(metrics)
        header, rows = read_rows(path)
        if not header or [k for k in flat if k not in header]:  # the first row, or new columns
            columns = [*header, *(k for k in flat if k not in header)]
            old = [dict(zip(header, row)) for row in rows]
            write_rows(path, columns, [[r.get(k, "") for k in columns] for r in old] + [[_cell(flat.get(k)) for k in columns]])
            return
        with open(path, "a", newline="", encoding="utf-8") as f:
            csv.writer(f, lineterminator="\n").writerow([_cell(flat.get(k)) for k in header])
            f.flush()
            os.fsync(f.fileno())

    def on_run_end(self, run: Any, metrics: dict | None) -> None:
        pass

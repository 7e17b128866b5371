"""Writes the operating system refuses (a full disk, a quota, a read-only file system): every file
a run writes fails in one line naming the file and the run, nothing half-written replaces a good
file, and ``contsup train --resume`` finishes the run once space is freed, as if nothing happened."""

from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path

import pytest

from contsup.cli import main
from contsup.training import rundir
from contsup.training.checkpoint import checkpoint_paths

from tiny import assert_same_runs, one_thread, tiny_recipe_text  # noqa: F401 (fixture)


class _FullFile:
    """A file on a disk that fills up after ``room`` more bytes: the write that crosses it writes
    what fits and raises ENOSPC, as a real file system does."""

    def __init__(self, f, room: list[int], code: int) -> None:
        self._f, self._room, self._code = f, room, code

    def write(self, data):
        if len(data) > self._room[0]:
            self._f.write(data[: self._room[0]])
            self._room[0] = 0
            raise OSError(self._code, os.strerror(self._code))
        self._room[0] -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def _disk_fills(monkeypatch, name: str, room: int = 100, code: int = errno.ENOSPC) -> None:
    """From now on, writing a file called ``name`` (or its temporary sibling ``.name.XXXX.tmp``)
    runs out of space after ``room`` bytes."""
    left = [room]

    def matches(path) -> bool:
        base = os.path.basename(str(path))
        return base == name or base.startswith(f".{name}.")

    real_fdopen, real_open = os.fdopen, builtins.open

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        return _FullFile(f, left, code) if matches(os.readlink(f"/proc/self/fd/{fd}")) else f

    def open_(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        return _FullFile(f, left, code) if matches(path) else f

    monkeypatch.setattr(os, "fdopen", fdopen)
    monkeypatch.setattr(rundir, "open", open_, raising=False)


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, captured.err
    return lines[0]


def _straight(write_recipe, tmp_path, capsys) -> Path:
    run = tmp_path / "straight"
    assert main(["train", str(write_recipe(tiny_recipe_text(run), "straight.toml"))]) == 0
    capsys.readouterr()
    return run


def _no_partial_writes(run: Path) -> None:
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


def _train_on_a_filling_disk(write_recipe, tmp_path, monkeypatch, name: str, **fill) -> tuple[Path, Path]:
    """Train the tiny recipe into tmp_path/run while writing ``name`` fills the disk
    (:func:`_disk_fills` with ``fill``); the run must stop with exit status 1. Returns the run
    directory and the recipe file."""
    run = tmp_path / "run"
    recipe = write_recipe(tiny_recipe_text(run), "run.toml")
    with monkeypatch.context() as m:
        _disk_fills(m, name, **fill)
        assert main(["train", str(recipe)]) == 1
    return run, recipe


def test_a_checkpoint_that_fills_the_disk_stops_in_one_line_keeping_the_last_one(write_recipe, tmp_path, monkeypatch, capsys):
    # the checkpoint of epoch 2; torch's zip writer sees it fail
    run, _ = _train_on_a_filling_disk(write_recipe, tmp_path, monkeypatch, "step-000000008.pt", room=5000)
    line = _one_error_line(capsys)
    assert line.startswith(f"error: cannot write {run / 'checkpoints' / 'step-000000008.pt'} (No space left on device) "
                           f"for the run {run}; the last good checkpoint is {run / 'checkpoints' / 'step-000000004.pt'}")
    assert "unexpected pos" not in line and line.endswith(f"contsup train --resume {run} finishes the run")
    assert [p.name for p in checkpoint_paths(run)] == ["step-000000004.pt"]
    assert not (run / "model.pt").exists()
    _no_partial_writes(run)

    assert main(["train", "--resume", str(run)]) == 0  # space freed
    assert_same_runs(_straight(write_recipe, tmp_path, capsys), run)


def test_model_pt_filling_the_disk_keeps_the_final_checkpoint_and_resume_writes_it(write_recipe, tmp_path, monkeypatch, capsys):
    run, _ = _train_on_a_filling_disk(write_recipe, tmp_path, monkeypatch, "model.pt", room=3000)
    line = _one_error_line(capsys)
    assert line.startswith(f"error: cannot write {run / 'model.pt'} (No space left on device) for the run {run}; "
                           f"the last good checkpoint is {run / 'checkpoints' / 'step-000000008.pt'} (end of epoch 2)")
    assert not (run / "model.pt").exists() and not (run / "model.pt.sha256").exists()
    _no_partial_writes(run)
    before = (run / "checkpoints" / "step-000000008.pt").read_bytes()

    assert main(["train", "--resume", str(run)]) == 0
    assert (run / "checkpoints" / "step-000000008.pt").read_bytes() == before  # nothing trained again
    assert_same_runs(_straight(write_recipe, tmp_path, capsys), run)


def test_metrics_filling_the_disk_stop_in_one_line_and_resume_rewrites_the_torn_line(write_recipe, tmp_path, monkeypatch, capsys):
    run, _ = _train_on_a_filling_disk(write_recipe, tmp_path, monkeypatch, "metrics.jsonl", room=600)  # epoch 2's line is torn
    line = _one_error_line(capsys)
    assert line.startswith(f"error: cannot write {run / 'metrics.jsonl'} (No space left on device) for the run {run}; "
                           f"the last good checkpoint is {run / 'checkpoints' / 'step-000000004.pt'}")
    assert len(rundir.read_metrics(run)) == 1  # the torn second line is skipped

    assert main(["train", "--resume", str(run)]) == 0
    assert_same_runs(_straight(write_recipe, tmp_path, capsys), run)


def test_a_run_that_cannot_write_its_recipe_leaves_nothing_and_the_same_command_works_later(write_recipe, tmp_path, monkeypatch, capsys):
    run, recipe = _train_on_a_filling_disk(write_recipe, tmp_path, monkeypatch, "recipe.toml", room=0)
    line = _one_error_line(capsys)
    assert line == (f"error: cannot write {run / 'recipe.toml'} (No space left on device) for the run {run}; nothing was "
                    f"trained yet and the half-made run directory was removed; once space is freed, the same command "
                    f"starts the run")
    assert not run.exists()
    assert main(["train", str(recipe)]) == 0


def test_the_first_checkpoint_failing_empties_metrics_so_the_resume_trains_from_the_start(write_recipe, tmp_path, monkeypatch, capsys):
    run, _ = _train_on_a_filling_disk(write_recipe, tmp_path, monkeypatch, "step-000000004.pt")
    line = _one_error_line(capsys)
    assert "no checkpoint was written yet" in line and "metrics.jsonl was emptied" in line
    assert rundir.read_metrics(run) == [] and checkpoint_paths(run) == []

    assert main(["train", "--resume", str(run)]) == 0
    assert_same_runs(_straight(write_recipe, tmp_path, capsys), run)


def test_resuming_while_the_disk_is_still_full_changes_nothing(write_recipe, tmp_path, monkeypatch, capsys):
    run, _ = _train_on_a_filling_disk(write_recipe, tmp_path, monkeypatch, "step-000000008.pt")
    capsys.readouterr()
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with monkeypatch.context() as m:
        _disk_fills(m, "metrics.jsonl", room=0)  # a resume first rewrites metrics.jsonl to its checkpoint's epochs
        assert main(["train", "--resume", str(run)]) == 1
    line = _one_error_line(capsys)
    assert line.startswith(f"error: cannot write {run / 'metrics.jsonl'} (No space left on device) for the run {run}; "
                           f"its checkpoint {run / 'checkpoints' / 'step-000000004.pt'} is kept")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    assert main(["train", "--resume", str(run)]) == 0
    assert_same_runs(_straight(write_recipe, tmp_path, capsys), run)


@pytest.mark.parametrize("code, then", [(errno.EDQUOT, "space is freed (or the quota raised)"),
                                        (errno.EROFS, "the file system is writable again")])
def test_a_quota_or_a_read_only_file_system_says_what_to_fix(write_recipe, tmp_path, monkeypatch, capsys, code, then):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _disk_fills(m, "model.pt", code=code)
        assert main(["train", str(write_recipe(tiny_recipe_text(run, epochs=1), "run.toml"))]) == 1
    line = _one_error_line(capsys)
    assert f"cannot write {run / 'model.pt'} ({os.strerror(code)}) for the run {run}" in line
    assert line.endswith(f"once {then}, contsup train --resume {run} finishes the run")


def test_a_results_table_that_fills_the_disk_names_the_file_and_keeps_the_old_one(write_recipe, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(["train", str(write_recipe(tiny_recipe_text(run, epochs=1, train_size=8), "run.toml"))]) == 0
    table = tmp_path / "table.md"
    table.write_text("the previous table\n")
    capsys.readouterr()
    with monkeypatch.context() as m:
        _disk_fills(m, "table.md")
        assert main(["results", str(run), "--markdown", str(table)]) == 1
    assert _one_error_line(capsys) == f"error: {table}: No space left on device"
    assert table.read_text() == "the previous table\n"

"""Run directories in the wrong place or with files damaged, missing or malicious: one line each,
and what a checkpoint can repair (``model.pt``, ``recipe.toml``) a resume repairs."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest
import torch

from contsup.cli import main
from contsup.training import rundir

from tiny import assert_same_runs, one_thread, tiny_recipe_text  # noqa: F401 (fixture)


def _finished(write_recipe, tmp_path, capsys, name="run") -> Path:
    run = tmp_path / name
    assert main(["train", str(write_recipe(tiny_recipe_text(run, epochs=1, train_size=16), f"{name}.toml"))]) == 0
    capsys.readouterr()
    return run


def _lines(capsys, label="error") -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith(f"{label}:")]


class _Evil:
    """What a malicious model.pt holds: unpickling it would call ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_out_dir_pointing_at_a_file_says_so(write_recipe, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["train", str(write_recipe(tiny_recipe_text(tmp_path / "afile"), "r.toml"))]) == 2
    assert _lines(capsys) == [f"error: run directory {tmp_path / 'afile'} is a file, not a directory; set run.out_dir "
                              f"to a directory (or pass --new for a fresh afile-N directory beside it)"]


@pytest.mark.parametrize("where", ["/proc/contsup-test/run", "{tmp}/afile/run"])
def test_out_dir_that_cannot_be_created_exits_2_in_one_line(write_recipe, tmp_path, capsys, where):
    (tmp_path / "afile").write_text("x")
    out = Path(where.format(tmp=tmp_path))
    assert main(["train", str(write_recipe(tiny_recipe_text(out), "r.toml"))]) == 2
    (line,) = _lines(capsys)
    assert line.startswith(f"error: run directory {out} cannot be created (") and line.endswith(
        "set run.out_dir to a directory that can be written")


def test_a_refused_write_names_the_file_not_its_temporary_sibling(tmp_path, monkeypatch):
    def mkstemp(dir, prefix, suffix):
        name = os.path.join(dir, f"{prefix}abcd{suffix}")
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    with pytest.raises(OSError) as err:
        rundir.atomic_write(tmp_path / "recipe.toml", lambda f: f.write("x"), binary=False)
    assert (err.value.errno, err.value.filename) == (errno.EACCES, str(tmp_path / "recipe.toml"))


def test_a_truncated_model_pt_is_written_again_from_the_final_checkpoint_on_resume(write_recipe, tmp_path, capsys):
    run = _finished(write_recipe, tmp_path, capsys)
    good = (run / "model.pt").read_bytes()
    (run / "model.pt").write_bytes(good[:1000])
    assert main(["train", "--resume", str(run)]) == 0
    checkpoint = run / "checkpoints" / "step-000000002.pt"
    assert _lines(capsys, "warning") == [
        f"warning: {run / 'model.pt'} cannot be used (truncated or extended: 1000 bytes, {len(good)} were written); "
        f"writing it again from {checkpoint}"]
    assert (run / "model.pt").read_bytes() == good
    assert main(["eval", str(run)]) == 0


def test_a_deleted_recipe_is_restored_from_the_checkpoint_on_resume(write_recipe, tmp_path, capsys):
    straight = tmp_path / "straight"
    assert main(["train", str(write_recipe(tiny_recipe_text(straight), "straight.toml"))]) == 0
    run = tmp_path / "run"
    assert main(["train", str(write_recipe(tiny_recipe_text(run), "run.toml"))]) == 0
    capsys.readouterr()
    (run / "recipe.toml").unlink()
    (run / "model.pt").unlink()
    assert main(["train", "--resume", str(run)]) == 0
    assert _lines(capsys, "warning") == [
        f"warning: {run / 'recipe.toml'} was missing; restored it from the recipe in {run / 'checkpoints' / 'step-000000008.pt'}"]
    assert "as recipe.toml was missing" in (run / "recipe.toml").read_text()
    assert_same_runs(straight, run)


def test_a_directory_without_recipe_or_checkpoints_is_not_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 2
    assert _lines(capsys) == [f"error: --resume {tmp_path / 'empty'}: not a run directory (it has no recipe.toml)"]


def test_a_malicious_model_pt_is_refused_in_contsups_words_by_every_command_and_repaired_by_resume(
    write_recipe, tmp_path, capsys,
):
    run = _finished(write_recipe, tmp_path, capsys)
    good = (run / "model.pt").read_bytes()
    marker = tmp_path / "ran"
    torch.save({"w": _Evil(marker)}, run / "model.pt")
    (run / "model.pt.sha256").unlink()
    refused = (f"error: {run / 'model.pt'}: it holds pickled objects other than tensors, refused unread (loading them "
               f"could run code), so it is not the file contsup wrote; contsup train --resume {run} writes it again "
               f"from the run's final checkpoint")
    for command in (["eval", str(run)], ["weights", str(run)], ["probe", str(run)], ["bench", "--inference", str(run)]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert "weights_only" not in err and "\\n" not in err and "Traceback" not in err
        assert [line for line in err.splitlines() if line.startswith("error:")] == [refused], command
    assert not marker.exists()
    assert main(["train", "--resume", str(run)]) == 0
    assert (run / "model.pt").read_bytes() == good and not marker.exists()


def test_a_malicious_checkpoint_is_set_aside_in_contsups_words(write_recipe, tmp_path, capsys):
    run = _finished(write_recipe, tmp_path, capsys)
    marker = tmp_path / "ran"
    bad = run / "checkpoints" / "step-000000009.pt"
    torch.save({"model": _Evil(marker)}, bad)
    (run / "model.pt").unlink()
    (run / "model.pt.sha256").unlink()
    assert main(["train", "--resume", str(run)]) == 0
    (line,) = [x for x in _lines(capsys, "warning") if "step-000000009" in x]
    assert line == (f"warning: checkpoint {bad} is damaged: it holds pickled objects other than tensors, refused unread "
                    f"(loading them could run code); using the one before it")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["metrics.jsonl", "model.pt"])
def test_a_folder_where_a_run_file_belongs_is_one_line_exit_2(write_recipe, tmp_path, capsys, name):
    """Before: `error: RUN/metrics.jsonl: Is a directory`, exit 1, as if the machine had failed."""
    run = _finished(write_recipe, tmp_path, capsys)
    (run / name).unlink()
    (run / name).mkdir()
    commands = [["results", str(run)], ["report", str(run)]] if name == "metrics.jsonl" else [["train", "--resume", str(run)]]
    for command in commands:
        assert main(command) == 2, command
        assert _lines(capsys) == [
            f"error: {run / name} is a directory where a file belongs; move it out of the way and run the command again"
        ]
    if name == "model.pt":
        assert main(["eval", str(run)]) == 2
        assert _lines(capsys) == [f"error: {run / name}: cannot be read (Is a directory)"]


def test_results_say_when_the_metrics_stop_at_a_line_cut_short(write_recipe, tmp_path, capsys):
    """A metrics.jsonl cut in the middle of its last line: the figures would quietly be one epoch
    short (the attack scored it 'silent'); results now say which line was skipped."""
    run = tmp_path / "run"
    assert main(["train", str(write_recipe(tiny_recipe_text(run, epochs=2, train_size=16), "r.toml"))]) == 0
    capsys.readouterr()
    metrics = run / "metrics.jsonl"
    text = metrics.read_bytes()
    metrics.write_bytes(text[: text.index(b"\n") + 10])  # the first epoch whole, the second cut short
    assert main(["results", str(run)]) == 0
    assert _lines(capsys, "warning") == [
        f"warning: {metrics}: line 2 is cut short (a write that did not finish); skipped",
        f"warning: {metrics}: holds 1 of the 2 epochs of a finished run (model.pt is written); "
        f"its last figures are not the run's final ones"]


def test_results_say_when_a_finished_runs_metrics_lack_epochs(write_recipe, tmp_path, capsys):
    """metrics.jsonl cut at a line boundary parses cleanly: only the count against run.epochs of
    a finished run tells that its figures are not the final ones."""
    run = tmp_path / "run"
    assert main(["train", str(write_recipe(tiny_recipe_text(run, epochs=2, train_size=16), "r.toml"))]) == 0
    capsys.readouterr()
    metrics = run / "metrics.jsonl"
    text = metrics.read_bytes()
    metrics.write_bytes(text[: text.index(b"\n") + 1])
    assert main(["results", str(run)]) == 0
    assert _lines(capsys, "warning") == [
        f"warning: {metrics}: holds 1 of the 2 epochs of a finished run (model.pt is written); "
        f"its last figures are not the run's final ones"]
    metrics.write_bytes(text)
    assert main(["results", str(run)]) == 0 and _lines(capsys, "warning") == []

"""Reliability of run directories (issue 18): the run-directory lock, resumes that never rewrite
finished work, digests of model.pt and checkpoints, damaged files reported in one line, SIGHUP,
and what kills leave behind."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import contsup
from contsup.cli import main
from contsup.errors import ContsupError
from contsup.training.checkpoint import checkpoint_paths, load_latest, save_checkpoint
from contsup.training.order import ignore_interrupts
from contsup.training.progress import Progress
from contsup.training.rundir import read_metrics

from tiny import one_thread, tiny_recipe_text  # noqa: F401 (fixture)


def _signal_at(monkeypatch, global_step: int, signum: int = signal.SIGINT) -> None:
    """Send ourselves ``signum`` right after the given step (counted over the whole run)."""
    original = Progress.update
    count = {"n": 0}

    def update(self, step, losses):
        count["n"] += 1
        if count["n"] == global_step:
            os.kill(os.getpid(), signum)
        original(self, step, losses)

    monkeypatch.setattr(Progress, "update", update)


def _stopped_run(write_recipe, tmp_path, monkeypatch, capsys, name="run", step=6, **kwargs) -> Path:
    """Two epochs of 4 steps, stopped with Ctrl-C after ``step`` (6: inside epoch 2, epoch 1 in metrics.jsonl)."""
    run = tmp_path / name
    path = write_recipe(tiny_recipe_text(run, **kwargs), f"{name}.toml")
    with monkeypatch.context() as m:
        _signal_at(m, step)
        assert main(["train", str(path)]) == 130
    capsys.readouterr()
    return run


def _finished_run(write_recipe, tmp_path, capsys, name="done", epochs=1) -> Path:
    run = tmp_path / name
    assert main(["train", str(write_recipe(tiny_recipe_text(run, epochs=epochs, train_size=8), f"{name}.toml"))]) == 0
    capsys.readouterr()
    return run


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# -- the run-directory lock ------------------------------------------------------------------


def test_resuming_a_run_another_process_holds_exits_2_naming_it_and_a_dead_holders_lock_is_taken_over(
    write_recipe, tmp_path, monkeypatch, capsys,
):
    run = _stopped_run(write_recipe, tmp_path, monkeypatch, capsys)
    assert not (run / ".lock").exists()  # released when the run stopped
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, socket, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, f'{os.getpid()} {socket.gethostname()}\\n'.encode())\n"
         "print('locked', flush=True)\n"
         "time.sleep(120)\n",
         str(run / ".lock")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        before = _snapshot(run)
        assert main(["train", "--resume", str(run)]) == 2
        assert _error_lines(capsys) == [
            f"error: {run} is in use by process {holder.pid} on {socket.gethostname()} (it holds {run}/.lock); "
            f"wait for it to end, or stop it first"
        ]
        assert _snapshot(run) == before  # nothing touched: not the metrics, not the checkpoints
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock file is stale and taken over with one warning
    assert main(["train", "--resume", str(run)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {run}: took over the lock left by process {holder.pid} on {socket.gethostname()}, "
        f"which is no longer running"
    ]
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2]
    assert not (run / ".lock").exists()


def test_the_lock_is_held_while_training_and_released_at_the_end_and_on_a_stop(write_recipe, tmp_path, monkeypatch, capsys):
    run = tmp_path / "held"
    seen = []
    original = Progress.update

    def update(self, step, losses):
        fd = os.open(run / ".lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append(os.pread(fd, 100, 0).decode())
        finally:
            os.close(fd)
        original(self, step, losses)

    monkeypatch.setattr(Progress, "update", update)
    assert main(["train", str(write_recipe(tiny_recipe_text(run, epochs=1, train_size=16), "held.toml"))]) == 0
    assert seen and set(seen) == {f"{os.getpid()} {socket.gethostname()}\n"}
    assert not (run / ".lock").exists()
    monkeypatch.undo()
    stopped = _stopped_run(write_recipe, tmp_path, monkeypatch, capsys, name="stopped", step=2)
    assert not (stopped / ".lock").exists()
    # a lock held in this process through another open file refuses too (flock is per open file)
    fd = os.open(stopped / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(ContsupError, match=r"is in use by another process \(it holds "):
            contsup.train(resume=stopped)
    finally:
        os.close(fd)


# -- a finished run is never retrained --------------------------------------------------------


def test_a_finished_run_whose_checkpoints_are_gone_is_not_retrained(write_recipe, tmp_path, capsys):
    run = _finished_run(write_recipe, tmp_path, capsys)
    shutil.rmtree(run / "checkpoints")
    before = _snapshot(run)
    assert main(["train", "--resume", str(run)]) == 2
    assert _error_lines(capsys) == [
        f"error: --resume {run}: the run finished (1 epochs in metrics.jsonl) and has its model.pt, but no "
        f"checkpoint is left in {run}/checkpoints; it cannot be trained on, and it is not retrained over its "
        f"results: start a new run with --new"
    ]
    assert _snapshot(run) == before


def test_an_unfinished_run_whose_checkpoints_are_gone_keeps_its_metrics(write_recipe, tmp_path, monkeypatch, capsys):
    run = _stopped_run(write_recipe, tmp_path, monkeypatch, capsys)
    assert [m["epoch"] for m in read_metrics(run)] == [1]
    shutil.rmtree(run / "checkpoints")
    before = _snapshot(run)
    assert main(["train", "--resume", str(run)]) == 2
    assert _error_lines(capsys) == [
        f"error: --resume {run}: metrics.jsonl records 1 finished epoch(s) but no checkpoint is left in "
        f"{run}/checkpoints to continue from; resuming would retrain from the beginning and drop them: put the "
        f"checkpoints back, or start a new run with --new"
    ]
    assert _snapshot(run) == before


def test_checkpoints_replaced_by_a_file_wipe_nothing(write_recipe, tmp_path, monkeypatch, capsys):
    run = _stopped_run(write_recipe, tmp_path, monkeypatch, capsys)
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("not a folder")
    before = _snapshot(run)
    assert main(["train", "--resume", str(run)]) == 2
    assert _error_lines(capsys) == [
        f"error: --resume {run}: {run}/checkpoints is not a directory, so the run's checkpoints are not there; "
        f"put them back (nothing was changed)"
    ]
    assert _snapshot(run) == before


# -- digests ---------------------------------------------------------------------------------


def test_model_pt_has_a_digest_and_a_changed_model_is_refused_in_one_line(write_recipe, tmp_path, capsys):
    run = _finished_run(write_recipe, tmp_path, capsys)
    model = run / "model.pt"
    digest, size = (run / "model.pt.sha256").read_text().split()
    assert int(size) == model.stat().st_size
    good = model.read_bytes()
    assert main(["eval", str(run)]) == 0
    assert "warning" not in capsys.readouterr().err
    bad = bytearray(good)
    bad[-100] ^= 0x40  # one flipped bit, inside the weights
    model.write_bytes(bytes(bad))
    message = (f"{model} is damaged: its contents changed after writing (SHA-256 mismatch); evaluate the run's "
               f"last checkpoint instead (move model.pt away and run contsup eval)")
    assert main(["eval", str(run)]) == 2
    assert _error_lines(capsys) == [f"error: {message}"]
    with pytest.raises(ContsupError) as err:
        contsup.load_model(run)
    assert err.value.lines == (message,)
    # without its digest (a run from before digests) it loads, with one line saying it is unverified
    model.write_bytes(good)
    (run / "model.pt.sha256").unlink()
    assert main(["eval", str(run)]) == 0
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")] == [
        f"warning: {model} could not be verified: it has no digest (model.pt.sha256)"
    ]
    contsup.load_model(run)
    assert capsys.readouterr().err.count("could not be verified") == 1


@pytest.mark.parametrize("content, what", [(torch.zeros(3), "a Tensor"), ([1, 2], "a list"),
                                           ({"w": [1.0]}, "a dict of other things than tensors")])
def test_a_model_pt_that_is_no_state_dict_is_one_line(write_recipe, tmp_path, capsys, content, what):
    run = _finished_run(write_recipe, tmp_path, capsys)
    torch.save(content, run / "model.pt")
    (run / "model.pt.sha256").unlink(missing_ok=True)
    message = f"{run / 'model.pt'}: holds {what}, not a network's weights (a state dict of tensors)"
    assert main(["eval", str(run)]) == 2
    assert _error_lines(capsys)[-1] == f"error: {message}"
    with pytest.raises(ContsupError) as err:
        contsup.load_model(run)
    assert err.value.lines == (message,)


def test_a_checkpoint_without_its_digest_is_used_with_one_warning_when_none_verifies(write_recipe, tmp_path, monkeypatch, capsys):
    """A run whose checkpoints all lack digests (written before checkpoints had them): the newest."""
    run = _stopped_run(write_recipe, tmp_path, monkeypatch, capsys)
    for path in checkpoint_paths(run):
        path.with_name(path.name + ".sha256").unlink()
    latest = checkpoint_paths(run)[-1]
    warnings = []
    state, path = load_latest(run, warnings.append)
    assert path == latest and state["global_step"] == 6
    assert warnings == [
        f"checkpoint {latest} could not be verified: its digest file {latest.name}.sha256 is missing "
        f"(only its structure was checked)"
    ]


def test_a_checkpoint_without_its_digest_is_not_trusted_while_an_older_one_verifies(write_recipe, tmp_path, monkeypatch, capsys):
    """Every checkpoint is written with its digest, so one without is a damaged run: a flipped
    mantissa bit plus a deleted digest must not steer the resume. The older verified checkpoint is
    used, in one warning line, and the unverified one set aside."""
    run = _stopped_run(write_recipe, tmp_path, monkeypatch, capsys)
    *_, older, latest = checkpoint_paths(run)
    latest.with_name(latest.name + ".sha256").unlink()
    warnings = []
    state, path = load_latest(run, warnings.append)
    assert path == older and state["global_step"] < 6
    assert warnings == [
        f"checkpoint {latest} could not be verified: its digest file {latest.name}.sha256 is missing "
        f"(only its structure was checked): not trusted while {older.name}, an older one, verifies; using that one"
    ]
    assert checkpoint_paths(run)[-1] == older and latest.with_name(latest.name + ".corrupt").exists()


def test_a_folder_under_a_checkpoints_name_is_set_aside_and_the_one_before_used(write_recipe, tmp_path, monkeypatch, capsys):
    """Before, the folder was not seen as a checkpoint at all, and the run later failed to write
    over it saying no checkpoint was written yet."""
    run = _stopped_run(write_recipe, tmp_path, monkeypatch, capsys)
    *_, older, latest = checkpoint_paths(run)
    latest.unlink()
    latest.mkdir()
    warnings = []
    state, path = load_latest(run, warnings.append)
    assert path == older
    assert warnings == [f"checkpoint {latest} is damaged: it is not a file; using the one before it"]
    assert not latest.exists() and latest.with_name(latest.name + ".corrupt").is_dir()


def test_a_checkpoint_never_shows_under_its_name_without_its_digest(tmp_path, monkeypatch):
    """The digest is written before the checkpoint takes its name: a kill in between leaves
    an orphan digest (removed on the next write or load), never an unverifiable checkpoint."""
    seen = []
    original = os.replace

    def replace(src, dst):
        if str(dst).endswith(".pt"):
            seen.append(Path(str(dst) + ".sha256").exists())
        return original(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(tmp_path, {"global_step": 3, "payload": torch.ones(2)})
    assert seen == [True]


# -- damaged metrics --------------------------------------------------------------------------


def test_results_and_report_skip_a_metrics_line_with_a_bad_byte(write_recipe, tmp_path, capsys):
    run = _finished_run(write_recipe, tmp_path, capsys, epochs=2)
    metrics = run / "metrics.jsonl"
    raw = metrics.read_bytes()
    assert raw.count(b"\n") == 2
    metrics.write_bytes(raw.replace(b'"epoch": 1', b'"epoch": \xff1', 1))
    warning = f"warning: {metrics}: line 1 is not UTF-8 (byte 11 of the line); skipped"
    assert main(["results", str(run)]) == 0
    captured = capsys.readouterr()
    assert warning in captured.err.splitlines() and "Traceback" not in captured.err
    assert main(["report", str(run), "-o", str(tmp_path / "report")]) == 0
    assert warning in capsys.readouterr().err.splitlines()
    assert [m["epoch"] for m in read_metrics(run)] == [2]


# -- SIGHUP ----------------------------------------------------------------------------------


def test_sighup_stops_like_ctrl_c_with_a_checkpoint_and_exit_129(write_recipe, tmp_path, monkeypatch, capsys):
    def unhandled(signum, frame):
        raise AssertionError("SIGHUP reached the handler outside training: the run does not handle it")

    previous = signal.signal(signal.SIGHUP, unhandled)
    try:
        run = tmp_path / "hup"
        path = write_recipe(tiny_recipe_text(run), "hup.toml")
        with monkeypatch.context() as m:
            _signal_at(m, 3, signal.SIGHUP)
            assert main(["train", str(path)]) == 129
        err = capsys.readouterr().err
        assert "SIGHUP: stopping after this step to save a checkpoint" in err
        stops = [line for line in err.splitlines() if line.startswith("stopped: ")]
        assert stops == [
            f"stopped: stopped by SIGHUP at epoch 1, after step 3 of 4; saved checkpoint "
            f"{run}/checkpoints/step-000000003.pt; continue with: contsup train --resume {run}"
        ]
        assert signal.getsignal(signal.SIGHUP) is unhandled  # the previous handler is back
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert main(["train", "--resume", str(run)]) == 0


def test_data_loader_workers_leave_sighup_to_the_main_process():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGHUP)
    try:
        ignore_interrupts(0)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN  # multiprocessing ends workers with it
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGHUP, before[1])


# -- leftovers -------------------------------------------------------------------------------


def test_leftovers_of_kills_are_removed_on_resume(write_recipe, tmp_path, monkeypatch, capsys):
    run = _stopped_run(write_recipe, tmp_path, monkeypatch, capsys)
    (run / ".model.pt.k1ll3d.tmp").write_bytes(b"PK\x03\x04 half a model")  # killed writing model.pt
    (run / ".metrics.jsonl.x.tmp").write_text("{")
    orphan = run / "checkpoints" / "step-000000002.pt.sha256"  # killed while pruning step 2
    orphan.write_text("0" * 64 + "  10\n")
    assert main(["train", "--resume", str(run)]) == 0
    names = sorted(p.name for p in run.iterdir())
    assert not [n for n in names if n.endswith(".tmp")], names
    assert not orphan.exists()
    folder = run / "checkpoints"
    assert all((folder / p.name[: -len(".sha256")]).exists() for p in folder.glob("*.sha256"))


def test_an_orphan_digest_is_removed_when_pruning(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    orphan = folder / "step-000000001.pt.sha256"
    orphan.write_text("0" * 64 + "  10\n")
    save_checkpoint(tmp_path, {"global_step": 2, "payload": torch.ones(2)})
    assert sorted(p.name for p in folder.iterdir()) == ["step-000000002.pt", "step-000000002.pt.sha256"]


def test_contsup_eval_of_a_run_leaves_its_files_alone(write_recipe, tmp_path, monkeypatch, capsys):
    """A run that may be training writes a checkpoint's digest, then the checkpoint: eval must
    not take either for a leftover."""
    run = _stopped_run(write_recipe, tmp_path, monkeypatch, capsys)
    in_flight = [run / "checkpoints" / ".step-000000008.pt.abcd.tmp", run / "checkpoints" / "step-000000008.pt.sha256"]
    for path in in_flight:
        path.write_bytes(b"a write in progress")
    assert main(["eval", str(run)]) == 0
    assert all(path.exists() for path in in_flight)

"""Resuming runs: exactly as an uninterrupted run (after an epoch, inside an epoch, after Ctrl-C,
after kill -9), changed recipes refused unless forced, damaged checkpoints skipped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from contsup.training.checkpoint import checkpoint_paths, load_latest
from contsup.cli import main
from contsup.training.failures import Interrupted
from contsup.training.loop import Trainer
from contsup.training.progress import Progress
from contsup.config.recipe import loads_recipe
from contsup.training.resume import recipe_differences
from contsup.training.rundir import append_metrics, read_metrics

from conftest import ROOT
from tiny import assert_same_runs, one_thread, tiny_recipe_text, without_measured  # noqa: F401 (fixture)


def quiet_trainer(recipe, run_dir):
    return Trainer(recipe, run_dir, log=open(os.devnull, "w"))


def test_two_epochs_straight_equal_one_epoch_stop_and_resume_one(registries, tmp_path):
    recipe = loads_recipe(tiny_recipe_text(tmp_path / "x", epochs=2), registries, source="tiny.toml")
    straight = quiet_trainer(recipe, tmp_path / "a")
    straight.fit()

    first = quiet_trainer(recipe, tmp_path / "b")
    with pytest.raises(Interrupted, match=r"interrupted at end of epoch 1; saved checkpoint .*step-000000004\.pt"):
        first.fit(on_epoch=lambda m: first.request_stop())
    assert len(first.history) == 1

    state, path = load_latest(tmp_path / "b", warn=pytest.fail)
    assert (state["epoch"], state["batch"], state["global_step"]) == (2, 0, 4)
    resumed = quiet_trainer(recipe, tmp_path / "b")
    resumed.load_state(state)
    resumed.fit()

    for (name, a), (_, b) in zip(straight.network.state_dict().items(), resumed.network.state_dict().items()):
        assert torch.equal(a, b), name
    for oa, ob in zip(straight.strategy.optimizers, resumed.strategy.optimizers):
        for sa, sb in zip(oa.state.values(), ob.state.values()):
            assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert [s.get_last_lr() for s in straight.strategy.schedulers] == [s.get_last_lr() for s in resumed.strategy.schedulers]
    assert without_measured(straight.history) == without_measured(resumed.history)
    assert [m["epoch"] for m in resumed.history] == [1, 2]


def _sigint_at(monkeypatch, global_step: int) -> None:
    """Send ourselves Ctrl-C right after the given step (counted over the whole run)."""
    original = Progress.update
    count = {"n": 0}

    def update(self, step, losses):
        count["n"] += 1
        if count["n"] == global_step:
            os.kill(os.getpid(), signal.SIGINT)
        original(self, step, losses)

    monkeypatch.setattr(Progress, "update", update)


@pytest.mark.parametrize("mode, workers, stop", [("greedy", 0, 3), ("e2e", 0, 6), ("greedy", 1, 6)])
def test_ctrl_c_inside_an_epoch_then_resume_is_exact(write_recipe, tmp_path, capsys, monkeypatch, mode, workers, stop):
    """With workers, the loader's workers must start afresh each epoch from its generator, or a
    run resumed in epoch 2 would draw a different order (persistent workers draw their seed once)."""
    def text(run):
        return tiny_recipe_text(run, mode=mode).replace("batch_size = 8", f"batch_size = 8\nworkers = {workers}")

    straight = write_recipe(text(tmp_path / "a"), "a.toml")
    assert main(["train", str(straight)]) == 0

    run = tmp_path / "b"
    path = write_recipe(text(run), "b.toml")
    capsys.readouterr()
    with monkeypatch.context() as m:
        _sigint_at(m, stop)
        assert main(["train", str(path)]) == 130
    err = capsys.readouterr().err
    epoch, step = divmod(stop - 1, 4)
    where = f"epoch {epoch + 1}, after step {step + 1} of 4"
    assert "Ctrl-C: stopping after this step" in err
    assert f"stopped: interrupted at {where}; saved checkpoint {run}/checkpoints/step-00000000{stop}.pt; " \
           f"continue with: contsup train --resume {run}" in err
    assert "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back
    assert len(read_metrics(run)) == epoch and not (run / "model.pt").exists()

    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run} from {run}/checkpoints/step-00000000{stop}.pt ({where})" in out
    assert_same_runs(tmp_path / "a", run)


def train_process(path: Path, cwd: Path) -> subprocess.Popen:
    """`contsup train PATH` as a real process on one thread (stderr piped), as a user starts it."""
    env = {
        **os.environ, "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins"), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "contsup", "train", str(path)], cwd=cwd, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def test_checkpoint_every_steps_and_kill_9_inside_an_epoch(write_recipe, tmp_path):
    """A real `contsup train` process killed with SIGKILL resumes from its last checkpoint and
    finishes with every epoch's metrics exactly once, equal to an uninterrupted run."""
    run = tmp_path / "killed"
    text = tiny_recipe_text(run, epochs=3, train_size=192, batch_size=8, modules=2, context="E")
    text = text.replace("[run]\n", "[run]\ncheckpoint_every_steps = 4\n")  # 24 steps per epoch
    path = write_recipe(text, "killed.toml")
    proc = train_process(path, tmp_path)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            paths = checkpoint_paths(run)
            if paths and int(paths[-1].name[5:14]) >= 4:  # a mid-epoch checkpoint of epoch 1 exists
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "model.pt").exists()
    state, _ = load_latest(run, warn=pytest.fail)
    assert state["global_step"] >= 4 and state["batch"] > 0  # killed inside an epoch

    assert torch.get_num_threads() == 1  # as in the killed process, so results compare bit for bit
    (run / "checkpoints" / ".step-000000012.pt.k1ll3d.tmp").write_bytes(b"PK\x03\x04 half")  # a write cut short
    assert main(["train", "--resume", str(run)]) == 0
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2, 3]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    straight = tmp_path / "straight"
    assert main(["train", str(write_recipe(text.replace(str(run), str(straight)), "straight.toml"))]) == 0
    assert_same_runs(straight, run)


def test_sigterm_from_a_scheduler_checkpoints_at_the_next_step_and_the_run_resumes(write_recipe, tmp_path):
    """A real `contsup train` process sent SIGTERM (what schedulers send before SIGKILL) stops
    after its current step with a checkpoint, exits 143, and resumes to the same result."""
    run = tmp_path / "termed"
    text = tiny_recipe_text(run, epochs=2, train_size=192, batch_size=8, modules=2, context="E")
    text = text.replace("[run]\n", "[run]\ncheckpoint_every_steps = 4\n")  # 24 steps per epoch
    path = write_recipe(text, "termed.toml")
    proc = train_process(path, tmp_path)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not checkpoint_paths(run):
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert "SIGTERM: stopping after this step to save a checkpoint" in err and "Traceback" not in err
    last = [line for line in err.splitlines() if line.startswith("stopped: ")]
    assert len(last) == 1 and last[0].startswith("stopped: stopped by SIGTERM at epoch ")
    assert f"continue with: contsup train --resume {run}" in last[0]
    state, _ = load_latest(run, warn=pytest.fail)
    assert f"step-{state['global_step']:09d}.pt" in last[0]  # the checkpoint it names is the newest

    assert torch.get_num_threads() == 1
    assert main(["train", "--resume", str(run)]) == 0
    straight = tmp_path / "straight"
    assert main(["train", str(write_recipe(text.replace(str(run), str(straight)), "straight.toml"))]) == 0
    assert_same_runs(straight, run)


def _stopped_run(write_recipe, tmp_path, monkeypatch, capsys, name="run", step=4, **kwargs) -> tuple[Path, Path]:
    run = tmp_path / name
    path = write_recipe(tiny_recipe_text(run, **kwargs), f"{name}.toml")
    with monkeypatch.context() as m:
        _sigint_at(m, step)
        assert main(["train", str(path)]) == 130
    capsys.readouterr()
    return run, path


def test_a_changed_recipe_is_refused_unless_forced(write_recipe, tmp_path, monkeypatch, capsys):
    run, path = _stopped_run(write_recipe, tmp_path, monkeypatch, capsys)
    assert main(["train", "--resume", str(run), "--set", "optimizer.lr=0.1", "--set", "run.seed=3"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"error: --resume {run}: the recipe differs from the run's in optimizer.lr (0.05 -> 0.1), run.seed (0 -> 3); "
        f"resume with the run's own recipe, or pass --force to continue with the new values"
    ]
    # the recipe file it started from may be given again; only out_dir-like keys may differ freely
    assert main(["train", str(path), "--resume", str(run), "--set", "run.log_every=1", "--set", "optimizer.lr=0.1"]) == 2
    assert "optimizer.lr (0.05 -> 0.1)" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--set", "optimizer.lr=0.1", "--force"]) == 0
    captured = capsys.readouterr()
    assert "warning: resuming with a changed recipe (--force): optimizer.lr (0.05 -> 0.1)" in captured.err
    assert "lr = 0.1" in (run / "recipe.toml").read_text()
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2]


def test_recipe_differences_ignore_keys_that_change_nothing():
    saved = {"run": {"seed": 0, "out_dir": "a", "log_every": 0}, "optimizer": {"lr": 0.1}, "log": {"tensorboard": False}}
    now = {"run": {"seed": 0, "out_dir": "b", "log_every": 5}, "optimizer": {"lr": 0.1, "new": 1}, "log": {"tensorboard": True}}
    assert recipe_differences(saved, now) == ["optimizer.new ('(absent)' -> 1)"]


def test_a_section_key_newer_than_the_run_counts_as_its_default():
    saved = {"run": {"seed": 0}}  # written before [distributed] existed
    assert recipe_differences(saved, {"run": {"seed": 0}, "distributed": {"mode": "none", "micro_batches": 1}}) == []
    assert recipe_differences(saved, {"run": {"seed": 0}, "distributed": {"mode": "data"}}) == [
        "distributed.mode ('none' -> 'data')"
    ]


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(write_recipe, tmp_path, monkeypatch, capsys):
    run, _ = _stopped_run(write_recipe, tmp_path, monkeypatch, capsys, step=6)
    paths = checkpoint_paths(run)
    assert [p.name for p in paths] == ["step-000000004.pt", "step-000000006.pt"]
    latest = paths[-1]
    size = latest.stat().st_size
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated, as by a full disk
    assert main(["train", "--resume", str(run)]) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert warning == [
        f"warning: checkpoint {latest} is damaged: truncated or extended: 1000 bytes, {size} were written; "
        f"using the one before it"
    ]
    assert f"from {paths[0]} (end of epoch 1)" in captured.out
    assert (run / "checkpoints" / "step-000000006.pt.corrupt").exists()
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2]


def test_resume_refusals_are_one_line(write_recipe, tmp_path, monkeypatch, capsys):
    done = tmp_path / "done"
    assert main(["train", str(write_recipe(tiny_recipe_text(done, epochs=1, train_size=8), "done.toml"))]) == 0
    capsys.readouterr()
    cases = [
        (["train", "--resume", str(done)], f"--resume {done}: the run already finished its 1 epochs; to train on, raise run.epochs (--set run.epochs=2) and pass --force"),
        (["train", "--resume", str(tmp_path / "nope")], f"--resume {tmp_path / 'nope'}: no such run directory"),
        (["train", "--resume", str(tmp_path)], f"--resume {tmp_path}: not a run directory (it has no recipe.toml)"),
        (["train", "--resume", str(done), "--new"], "contsup train: --new and --resume exclude each other"),
        (["train", str(tmp_path / "done.toml"), "--force"], "contsup train: --force only applies with --resume RUN_DIR"),
        (["train"], "contsup train: give a recipe file, or --resume RUN_DIR to continue a run"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.splitlines() == [f"error: {message}"]
    # training on past the end is possible when asked for explicitly
    assert main(["train", "--resume", str(done), "--set", "run.epochs=2", "--force"]) == 0
    assert [m["epoch"] for m in read_metrics(done)] == [1, 2]


def test_a_run_stopped_before_its_first_checkpoint_starts_again(write_recipe, tmp_path, monkeypatch, capsys):
    run = tmp_path / "early"
    path = write_recipe(tiny_recipe_text(run, epochs=1), "early.toml")
    straight = tmp_path / "straight"
    assert main(["train", str(write_recipe(tiny_recipe_text(straight, epochs=1), "straight.toml"))]) == 0
    with monkeypatch.context() as m:
        m.setattr(Trainer, "fit", lambda self, on_epoch=None: (_ for _ in ()).throw(KeyboardInterrupt()))
        assert main(["train", str(path)]) == 130
    assert checkpoint_paths(run) == []
    (run / "metrics.jsonl").write_text('{"epoch": 1, "torn')  # a torn line is dropped on resume
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert "from the beginning (the run stopped before its first checkpoint)" in capsys.readouterr().out
    assert_same_runs(straight, run)


def test_metrics_written_after_the_last_checkpoint_are_recomputed_once(write_recipe, tmp_path, monkeypatch, capsys):
    run, _ = _stopped_run(write_recipe, tmp_path, monkeypatch, capsys, step=6)
    append_metrics(run, {"epoch": 2, "from": "a run killed after writing metrics, before its checkpoint"})
    assert main(["train", "--resume", str(run)]) == 0
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2] and "from" not in metrics[1]


def test_sigterm_to_the_whole_process_group_with_loader_workers_stops_at_a_step(write_recipe, tmp_path):
    """What docker stop, Slurm and systemd do: SIGTERM to every process of the job, data-loading
    workers included. The workers leave it to the main process, which stops after its step with
    a checkpoint (exit 143), not with a dead-worker traceback."""
    run = tmp_path / "group"
    text = tiny_recipe_text(run, epochs=2, train_size=192, batch_size=8, modules=2, context="E")
    text = text.replace("[run]\n", "[run]\ncheckpoint_every_steps = 4\n").replace("[data]\n", "[data]\nworkers = 1\n")
    path = write_recipe(text, "group.toml")
    env = {
        **os.environ, "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "contsup", "train", str(path)], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not checkpoint_paths(run):
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.killpg(proc.pid, signal.SIGTERM)
        err = proc.communicate(timeout=60)[1].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "DataLoader worker" not in err
    assert [line for line in err.splitlines() if line.startswith("stopped: ")][0].startswith("stopped: stopped by SIGTERM at epoch ")

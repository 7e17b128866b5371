"""Training failures end in one line and keep the last good checkpoint: non-finite losses,
running out of GPU memory, a second Ctrl-C in the middle of a step."""

from __future__ import annotations

import pytest
import torch

from contsup.training.checkpoint import checkpoint_paths, load_latest
from contsup.cli import main
from contsup.model.network import ContextModule, GreedyNetwork
from contsup.training.rundir import read_metrics

from tiny import assert_same_runs, one_thread, tiny_recipe_text  # noqa: F401 (fixture)


def lines_of(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith(("error:", "stopped:", "warning:"))]


def test_a_diverging_run_stops_with_one_line(write_recipe, tmp_path, capsys):
    run = tmp_path / "diverges"
    text = tiny_recipe_text(run).replace("lr = 0.05", "lr = 1e30\nmomentum = 0.0\nnesterov = false")
    assert main(["train", str(write_recipe(text))]) == 1
    assert lines_of(capsys.readouterr().err) == [
        "error: the loss of module 1 became nan at epoch 1, step 2; lower optimizer.lr or add "
        "schedule.warmup_epochs; no checkpoint was written yet"
    ]
    warm = text.replace("[optimizer]", "[schedule]\nwarmup_epochs = 0.5\n\n[optimizer]")
    assert main(["train", str(write_recipe(warm, "warm.toml")), "--new"]) == 1
    assert "lower optimizer.lr or lengthen schedule.warmup_epochs (now 0.5)" in capsys.readouterr().err


def test_an_epoch_line_without_a_measured_speed_still_prints():
    from contsup.training.loop import summary_line

    m = {"epoch": 1, "test_error_pct": 2.0, "test_local_acc_pct": [None, 50.0], "images_per_s": None, "epoch_time_s": 0.0}
    assert summary_line(m, 3) == "epoch 1/3: test error 2.00% | local acc % 50.0 | - img/s | 0.0s"


def _fail_in_module(monkeypatch, module: int, after_calls: int, fail) -> None:
    """Make module ``module``'s forward fail (``fail()``) from its ``after_calls``+1-th call on."""
    original = ContextModule.enrich
    calls = {"n": 0}

    def enrich(self, h, context):
        if self.index == module and self.training:
            calls["n"] += 1
            if calls["n"] > after_calls:
                return fail(h)
        return original(self, h, context)

    monkeypatch.setattr(ContextModule, "enrich", enrich)


def test_a_non_finite_loss_keeps_the_last_good_checkpoint(write_recipe, tmp_path, capsys, monkeypatch):
    run = tmp_path / "nan"
    _fail_in_module(monkeypatch, 2, 5, lambda h: h * float("nan"))  # from epoch 2, step 2 on
    assert main(["train", str(write_recipe(tiny_recipe_text(run)))]) == 1
    good = run / "checkpoints" / "step-000000004.pt"
    assert lines_of(capsys.readouterr().err) == [
        f"error: the loss of module 2 became nan at epoch 2, step 2; lower optimizer.lr or add "
        f"schedule.warmup_epochs; the last good checkpoint is {good} (end of epoch 1)"
    ]
    assert checkpoint_paths(run) == [good]
    state, _ = load_latest(run, warn=pytest.fail)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert [m["epoch"] for m in read_metrics(run)] == [1]


@pytest.mark.parametrize("mode", ["greedy", "e2e"])
def test_running_out_of_gpu_memory_names_the_module(write_recipe, tmp_path, capsys, monkeypatch, mode):
    def oom(h):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    run = tmp_path / "oom"
    _fail_in_module(monkeypatch, 3, 4, oom)  # epoch 2, step 1
    assert main(["train", str(write_recipe(tiny_recipe_text(run, modules=4, mode=mode)))]) == 1
    kept = f"the last good checkpoint is {run / 'checkpoints' / 'step-000000004.pt'} (end of epoch 1)"
    expected = {
        "greedy": "in module 3 of 4 at epoch 2, step 1; use more modules (partition.modules = 8), balance the "
        "modules by memory (partition.use = \"memory_balanced\") or lower data.batch_size",
        "e2e": "training end to end at epoch 2, step 1; train greedily (run.mode = \"greedy\", partition.modules >= 2) "
        "or lower data.batch_size",
    }[mode]
    assert lines_of(capsys.readouterr().err) == [f"error: the GPU ran out of memory {expected}; {kept}"]


def test_running_out_of_gpu_memory_while_evaluating(write_recipe, tmp_path, capsys, monkeypatch):
    def oom(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(GreedyNetwork, "module_outputs", oom)  # only evaluation uses it in greedy mode
    assert main(["train", str(write_recipe(tiny_recipe_text(tmp_path / "r")))]) == 1
    assert lines_of(capsys.readouterr().err) == [
        "error: the GPU ran out of memory evaluating after epoch 1; lower data.test_batch_size; "
        "no checkpoint was written yet"
    ]


def test_a_second_ctrl_c_inside_a_step_keeps_the_last_checkpoint(write_recipe, tmp_path, capsys, monkeypatch):
    straight = tmp_path / "straight"
    assert main(["train", str(write_recipe(tiny_recipe_text(straight), "straight.toml"))]) == 0
    run = tmp_path / "run"
    path = write_recipe(tiny_recipe_text(run), "run.toml")

    def interrupt(h):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        _fail_in_module(m, 2, 6, interrupt)  # inside epoch 2, step 3, after module 1 already stepped
        assert main(["train", str(path)]) == 130
    assert lines_of(capsys.readouterr().err) == [
        f"stopped: interrupted in the middle of a step; the last good checkpoint is "
        f"{run / 'checkpoints' / 'step-000000004.pt'} (end of epoch 1); continue with: contsup train --resume {run}"
    ]
    assert main(["train", "--resume", str(run)]) == 0
    assert_same_runs(straight, run)


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(write_recipe, tmp_path, capsys, monkeypatch):
    import errno

    run = tmp_path / "full"
    saved = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:  # the second checkpoint finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return saved(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert main(["train", str(write_recipe(tiny_recipe_text(run)))]) == 1
    good = run / "checkpoints" / "step-000000004.pt"
    assert lines_of(capsys.readouterr().err) == [
        f"error: cannot write {run / 'checkpoints' / 'step-000000008.pt'} (No space left on device) for the run {run}; "
        f"the last good checkpoint is {good} (end of epoch 1), and no half-written file replaced a complete one; "
        f"once space is freed, contsup train --resume {run} finishes the run"
    ]
    assert checkpoint_paths(run) == [good] and not list((run / "checkpoints").glob(".*.tmp"))
    monkeypatch.setattr("contsup.training.rundir.append_metrics", lambda *a: (_ for _ in ()).throw(
        OSError(errno.EACCES, "Permission denied", str(run / "metrics.jsonl"))))
    monkeypatch.setattr(torch, "save", saved)
    assert main(["train", "--resume", str(run)]) == 1
    assert lines_of(capsys.readouterr().err) == [
        f"error: cannot write {run / 'metrics.jsonl'} (Permission denied) for the run {run}; the last good checkpoint "
        f"is {good}, and no half-written file replaced a complete one; once the run directory is "
        f"writable, contsup train --resume {run} finishes the run"]

"""The TensorBoard observer plugin: scalars per epoch when ``[log] tensorboard = true``, nothing
otherwise, no epoch twice after a resume, and one line at validation when tensorboard is missing."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

import contsup_tensorboard
from contsup.cli import main
from contsup.errors import ContsupError
from contsup.training.rundir import read_metrics

from tiny import one_thread, tiny_recipe_text  # noqa: F401 (fixture)

LOG = "\n[log]\ntensorboard = true\n"


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_a_run_logs_every_epoch_to_tensorboard(write_recipe, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert main(["train", str(write_recipe(tiny_recipe_text(run, extra=LOG)))]) == 0
    metrics = read_metrics(run)
    errors = scalars(run, "test/error_pct")
    assert [step for step, _ in errors] == [1, 2]
    assert [v for _, v in errors] == pytest.approx([m["test_error_pct"] for m in metrics])
    for module in (1, 2, 3):
        logged = scalars(run, f"test_local_acc_pct/module_{module:02d}")
        assert [v for _, v in logged] == pytest.approx([m["test_local_acc_pct"][module - 1] for m in metrics])
    assert [v for _, v in scalars(run, "train/lr")] == pytest.approx([m["lr"] for m in metrics])


def test_a_resumed_run_replaces_the_epochs_after_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    recipe = SimpleNamespace(log=SimpleNamespace(tensorboard=True))

    def run_info(epoch):
        return SimpleNamespace(recipe=recipe, run_dir=tmp_path, epoch=epoch)

    first = run_info(0)
    contsup_tensorboard.on_run_start(run=first)
    for epoch, error in [(1, 50.0), (2, 40.0)]:
        contsup_tensorboard.on_epoch_end(run=first, epoch=epoch, metrics={"test_error_pct": error})
    # killed before the checkpoint of epoch 2: the resumed process starts after epoch 1
    del contsup_tensorboard._writers[tmp_path]
    second = run_info(1)
    contsup_tensorboard.on_run_start(run=second)
    contsup_tensorboard.on_epoch_end(run=second, epoch=2, metrics={"test_error_pct": 30.0})
    contsup_tensorboard.on_run_end(run=second, metrics=None)
    assert scalars(tmp_path, "test/error_pct") == [(1, 50.0), (2, 30.0)]


def test_without_the_log_key_nothing_is_written(write_recipe, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(write_recipe(tiny_recipe_text(run, epochs=1, train_size=8)))]) == 0
    assert not (run / "tensorboard").exists()


def test_enabled_without_tensorboard_installed_is_one_line_at_validation(write_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what an absent package looks like to import
    path = write_recipe(tiny_recipe_text(tmp_path / "run", extra=LOG))
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {path}: log.tensorboard: true needs the 'tensorboard' package, which is not installed; "
        f"pip install 'contsup[tensorboard]', or set it to false"
    ]
    assert main(["train", str(path)]) == 2 and not (tmp_path / "run").exists()  # refused before anything runs
    capsys.readouterr()
    assert main(["validate", str(path), "--set", "log.tensorboard=false"]) == 0


def test_the_plugin_itself_refuses_cleanly_when_the_writer_cannot_be_imported(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    run = SimpleNamespace(recipe=SimpleNamespace(log=SimpleNamespace(tensorboard=True)), run_dir=tmp_path, epoch=0)
    with pytest.raises(ContsupError, match="log.tensorboard: true needs the 'tensorboard' package"):
        contsup_tensorboard.on_run_start(run=run)

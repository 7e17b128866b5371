"""Loggers chosen by ``[log] use``: the built-in csv logger, MLflow for real (the mlflow package
of the test extra), W&B offline where wandb is installed; choices checked at validation in one
line each; a resumed run records every epoch once; a logger failing mid-run leaves the run going."""

from __future__ import annotations

import csv
import json
import sys
from types import SimpleNamespace

import attrs
import pytest

from contsup import hookimpl
from contsup.cli import main
from contsup.testing import plugin_manager, validate_recipe
from contsup.training.loop import Trainer
from contsup.training.rundir import read_metrics
from contsup_loggers.csv_file import CsvLogger
from contsup_loggers.flat import flatten

from tiny import one_thread, tiny_recipe_text  # noqa: F401 (fixture)


def log(*names: str, tables: str = "") -> str:
    return "\n[log]\nuse = [" + ", ".join(f'"{n}"' for n in names) + "]\n" + tables


def csv_rows(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def as_cells(metrics: dict) -> dict:
    return {k: "" if v is None else str(v) for k, v in flatten(metrics).items()}


def test_the_csv_logger_writes_one_row_per_epoch_one_column_per_scalar(write_recipe, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(write_recipe(tiny_recipe_text(run, extra=log("csv"))))]) == 0
    metrics = read_metrics(run)
    rows = csv_rows(run)
    assert list(rows[0])[:3] == ["epoch", "step", "lr"]
    assert {"train_loss_1", "train_loss_3", "test_local_acc_pct_3", "test_error_pct", "memory_kind"} <= set(rows[0])
    assert rows == [as_cells(m) for m in metrics]
    assert not (run / "mlruns").exists() and not (run / "tensorboard").exists()  # only what was asked for


def test_a_resumed_run_has_every_epoch_once_in_metrics_csv(write_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    path = write_recipe(tiny_recipe_text(run, epochs=1, extra=log("csv")))
    assert main(["train", str(path)]) == 0
    assert main(["train", "--resume", str(run), "--set", "run.epochs=2", "--force"]) == 0
    assert [r["epoch"] for r in csv_rows(run)] == ["1", "2"]
    assert csv_rows(run) == [as_cells(m) for m in read_metrics(run)]
    # killed after an epoch it logged but before its checkpoint: the resumed run drops that row
    logger = CsvLogger(CsvLogger.Options())
    logger.on_run_start(SimpleNamespace(run_dir=run, epoch=1))
    assert [r["epoch"] for r in csv_rows(run)] == ["1"]


def test_mlflow_records_a_digits_run_in_a_file_store_in_the_run_directory(tmp_path, capsys):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from conftest import MIXED_DIGITS

    recipe = tmp_path / "digits.toml"
    recipe.write_text(MIXED_DIGITS.format(epochs=2, mode="greedy", modules=2, context="R1E") + log("mlflow"))
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--set", f"run.out_dir={run}"]) == 0
    metrics = read_metrics(run)
    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "contsup"]
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    assert found.data.params["data.use"] == "digits" and found.data.params["partition.modules"] == "2"
    history = client.get_metric_history(found.info.run_id, "test_error_pct")
    assert [(h.step, h.value) for h in history] == [(m["epoch"], pytest.approx(m["test_error_pct"])) for m in metrics]
    acc = client.get_metric_history(found.info.run_id, "test_local_acc_pct_2")
    assert [h.value for h in acc] == pytest.approx([m["test_local_acc_pct"][1] for m in metrics])
    # resumed for a third epoch: the same MLflow run goes on
    assert main(["train", "--resume", str(run), "--set", "run.epochs=3", "--force"]) == 0
    (again,) = client.search_runs([experiment.experiment_id])
    assert again.info.run_id == found.info.run_id and again.info.status == "FINISHED"
    assert [h.step for h in client.get_metric_history(found.info.run_id, "test_error_pct")] == [1, 2, 3]


def test_mlflow_into_a_configured_store(write_recipe, tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a file:// store of one's own needs MLflow 3's opt-in
    store = (tmp_path / "shared-store").as_uri()
    tables = f'\n[log.mlflow]\ntracking_uri = "{store}"\nexperiment = "tiny"\nrun_name = "first"\n'
    run = tmp_path / "run"
    assert main(["train", str(write_recipe(tiny_recipe_text(run, epochs=1, extra=log("mlflow", tables=tables))))]) == 0
    client = MlflowClient(tracking_uri=store)
    (found,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert found.info.run_name == "first" and found.info.status == "FINISHED" and not (run / "mlruns").exists()


def test_wandb_offline_where_installed(write_recipe, tmp_path, capsys):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    assert main(["train", str(write_recipe(tiny_recipe_text(run, extra=log("wandb"))))]) == 0
    run_id = json.loads((run / "wandb.json").read_text())["run_id"]
    (offline,) = (run / "wandb").glob("offline-run-*")
    assert offline.name.endswith(f"-{run_id}") and (offline / f"run-{run_id}.wandb").stat().st_size > 0
    assert main(["train", "--resume", str(run), "--set", "run.epochs=3", "--force"]) == 0
    assert json.loads((run / "wandb.json").read_text())["run_id"] == run_id  # the same W&B run goes on


def test_log_choices_are_checked_at_validation_one_line_each(write_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an absent package looks like to import
    tables = '\n[log.mlflow]\nexperimen = "x"\n\n[log.wandbb]\nproject = "y"\n'
    path = write_recipe(tiny_recipe_text(tmp_path / "run", extra=log("csv", "mlfow", "mlflow", tables=tables)))
    assert main(["validate", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    expected = [  # each line as far as its suggestion (the choices after it are ordered by closeness)
        f"error: {path}: log.use: unknown logger 'mlfow'; did you mean 'mlflow'?",
        f"error: {path}: log.use: \"mlflow\" needs the 'mlflow' package, which is not installed; pip install "
        f"'contsup[mlflow]', or take \"mlflow\" out of log.use",
        f"error: {path}: log.wandbb: options of a logger that log.use does not name; did you mean 'wandb'?",
        f"error: {path}: log.mlflow.experimen: unknown key for logger 'mlflow'; did you mean 'experiment'?",
    ]
    assert len(lines) == len(expected) and all(line.startswith(e) for line, e in zip(lines, expected)), lines
    assert main(["train", str(path)]) == 2 and not (tmp_path / "run").exists()  # refused before anything runs


def test_tensorboard_true_is_a_synonym_of_naming_it(write_recipe, registries):
    both = validate_recipe(tiny_recipe_text("x", extra='\n[log]\ntensorboard = true\nuse = ["csv"]\n'))
    named = validate_recipe(tiny_recipe_text("x", extra=log("csv", "tensorboard")))
    assert [c.use for c in both.loggers] == ["csv", "tensorboard"] == [c.use for c in named.loggers]
    assert validate_recipe(tiny_recipe_text("x")).loggers == ()


class Flaky:
    """A logger whose second epoch fails."""

    name = "flaky"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options):
        self.epochs = []

    def on_run_start(self, run):
        pass

    def on_epoch_end(self, run, epoch, metrics):
        if epoch == 2:
            raise OSError(28, "No space left on device")
        self.epochs.append(epoch)

    def on_run_end(self, run, metrics):
        raise AssertionError("a dropped logger is not called again")


class FlakyPlugin:
    @hookimpl
    def register_loggers(self, register):
        register(Flaky)


def test_a_logger_failing_mid_run_is_dropped_with_one_warning(tmp_path, capsys):
    plugin = FlakyPlugin()
    recipe = validate_recipe(tiny_recipe_text(tmp_path, epochs=3, extra=log("flaky", "csv")), plugin)
    history = Trainer(recipe, tmp_path, hook=plugin_manager(plugin).hook, log=open("/dev/null", "w")).fit()
    assert len(history) == 3
    err = capsys.readouterr().err
    assert err.count("warning: log.use: the flaky logger failed at epoch 2 ([Errno 28] No space left on device); "
                     "it records nothing more in this run (metrics.jsonl has every epoch)") == 1
    assert [r["epoch"] for r in csv_rows(tmp_path)] == ["1", "2", "3"]  # the others go on


class CannotStart(Flaky):
    name = "cannot_start"

    def on_run_start(self, run):
        raise ConnectionError("tracking server unreachable")


class CannotStartPlugin:
    @hookimpl
    def register_loggers(self, register):
        register(CannotStart)


def test_a_logger_that_cannot_start_stops_the_run_before_its_first_epoch(tmp_path):
    from contsup.errors import ContsupError

    plugin = CannotStartPlugin()
    recipe = validate_recipe(tiny_recipe_text(tmp_path, extra=log("cannot_start")), plugin)
    trainer = Trainer(recipe, tmp_path, hook=plugin_manager(plugin).hook, log=open("/dev/null", "w"))
    with pytest.raises(ContsupError, match=r"^log.use: the cannot_start logger cannot start \(tracking server unreachable\)$"):
        trainer.fit()
    assert trainer.history == []

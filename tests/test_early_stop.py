"""run.early_stop: a run whose watched metric stops improving ends as finished (its epochs in
metrics.jsonl, a checkpoint, model.pt, the reason in its last line); a resumed run that had
stopped early trains nothing more; the rule is checked at validation."""

from __future__ import annotations

import pytest
import torch

from contsup.cli import main
from contsup.config.early_stop import EarlyStop, stop_reason
from contsup.training.checkpoint import checkpoint_paths
from contsup.training.rundir import read_metrics

from tiny import one_thread, tiny_recipe_text  # noqa: F401 (fixture)


def epochs(*errors: float) -> list[dict]:
    return [{"epoch": i, "test_error_pct": e, "test_local_acc_pct": [None, 100 - e]} for i, e in enumerate(errors, 1)]


def test_the_rule_stops_after_patience_epochs_without_improvement():
    rule = {"metric": "test_error_pct", "patience": 2}
    assert stop_reason(rule, []) is None
    assert stop_reason(rule, epochs(50, 40, 45)) is None  # one epoch since the best
    assert stop_reason(rule, epochs(50, 40, 45, 41)) == (
        "test_error_pct has not improved for 2 epochs (best 40 at epoch 2; patience 2)"
    )
    assert stop_reason(rule, epochs(50, 40, 45, 39)) is None  # improved again
    assert stop_reason(rule, epochs(50, 40, 40, 40)) is not None  # equal is no improvement
    delta = {**rule, "min_delta": 2}
    assert stop_reason(delta, epochs(50, 40, 39, 38.5)) == (
        "test_error_pct has not improved by more than 2 for 2 epochs (best 40 at epoch 2; patience 2)"
    )
    # an accuracy is better higher (a list counts by its last entry, the network's output)
    acc = {"metric": "test_local_acc_pct", "patience": 1}
    assert EarlyStop.from_table(acc).mode == "max"
    assert stop_reason(acc, epochs(50, 40)) is None and stop_reason(acc, epochs(40, 50)) is not None
    assert stop_reason({**acc, "mode": "min"}, epochs(50, 40)) is not None
    assert stop_reason({}, epochs(50, 60, 70)) is None


@pytest.mark.parametrize("table, message", [
    ('{metric = "test_eror_pct", patience = 3}', "run.early_stop: metric: 'test_eror_pct' is not a metric it can watch; did you mean 'test_error_pct'?"),
    ('{metric = "test_error_pct"}', "run.early_stop: patience: the epochs without improvement before stopping, an integer >= 1, got None"),
    ('{metric = "test_error_pct", patience = 0}', "run.early_stop: patience: the epochs without improvement before stopping, an integer >= 1, got 0"),
    ('{metric = "test_error_pct", patience = 2, min_delta = -1}', "run.early_stop: min_delta: the smallest change that counts as an improvement, a number >= 0, got -1"),
    ('{metric = "test_error_pct", patience = 2, mode = "up"}', "run.early_stop: mode: \"auto\""),
    ('{metric = "test_error_pct", patiense = 2}', "run.early_stop: unknown key 'patiense'; did you mean 'patience'?"),
    ('{patience = 2}', "run.early_stop: metric: give the metric to watch, one of test_error_pct"),
])
def test_a_bad_rule_is_one_line_at_validation(write_recipe, tmp_path, capsys, table, message):
    path = write_recipe(tiny_recipe_text(tmp_path / "run"))
    assert main(["validate", str(path), "--set", f"run.early_stop={table}"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {path}: {message}") and line.endswith("(from --set run.early_stop)"), line


def test_a_run_that_stops_early_is_finished(write_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    # no epoch can improve on the first by more than 100 points: it stops after epoch 2 of 5
    rule = '{metric = "test_error_pct", patience = 1, min_delta = 100}'
    path = write_recipe(tiny_recipe_text(run, epochs=5, extra=f"\n[log]\nuse = [\"csv\"]\n").replace(
        "[run]\n", f"[run]\nearly_stop = {rule}\n", 1))
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    reason = f"test_error_pct has not improved by more than 100 for 1 epochs (best {metrics[0]['test_error_pct']:.4g} at epoch 1; patience 1)"
    assert f"early stop after epoch 2 of 5: {reason}\n" in out
    assert f"; stopped early after epoch 2: {reason}; run directory: {run}" in out.splitlines()[-1]
    assert (run / "model.pt").exists() and len((run / "metrics.csv").read_text().splitlines()) == 3
    last = torch.load(checkpoint_paths(run)[-1], weights_only=True)
    assert last["epoch"] == 3 and last["batch"] == 0 and len(last["history"]) == 2  # the final checkpoint
    weights = torch.load(run / "model.pt", weights_only=True)
    # a finished run is not resumed; without its model.pt, a resume trains nothing and writes it again
    assert main(["train", "--resume", str(run)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --resume {run}: the run stopped early after epoch 2 ({reason}), so it is finished; to train on, "
        f"change or remove run.early_stop (--set 'run.early_stop={{}}') and pass --force"
    ]
    (run / "model.pt").unlink()
    (run / "model.pt.sha256").unlink()
    assert main(["train", "--resume", str(run)]) == 0
    assert "early stop after epoch 2 of 5" in capsys.readouterr().out
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2]
    again = torch.load(run / "model.pt", weights_only=True)
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    # the result table takes it as finished, without a warning about missing epochs
    assert main(["results", str(run)]) == 0
    assert "warning" not in capsys.readouterr().err
    # trained on, as the refusal says: the epochs it had left
    assert main(["train", "--resume", str(run), "--set", "run.early_stop={}", "--force"]) == 0
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2, 3, 4, 5]

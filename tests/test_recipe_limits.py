"""Recipes that validate also run: every number option stays within what torch and the data
plugins accept (checked when the recipe is validated, one line naming the key, the value and the
range), and a run that fails at its first step leaves no run directory behind."""

from __future__ import annotations

import attrs
import pytest

from contsup import api
from contsup.cli import main
from contsup.errors import ContsupError
from contsup.options import option, structure

from conftest import ROOT
from tiny import one_thread, tiny_recipe_text  # noqa: F401 (one_thread: a fixture, applied here)

DIGITS = ROOT / "recipes" / "digits.toml"


def validate_lines(capsys, path, *sets: str) -> list[str]:
    argv = ["validate", str(path)]
    for s in sets:
        argv += ["--set", s]
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return [str(code), *err.splitlines()]


@pytest.mark.parametrize("setting, line", [
    ("run.seed=18446744073709551616",
     "run.seed: must be a 64-bit integer, in [-9223372036854775808, 9223372036854775807], got 18446744073709551616"),
    ("data.split_seed=-1", "data.split_seed: must be >= 0, got -1"),
    ("data.split_seed=4294967296", "data.split_seed: must be <= 4294967295, got 4294967296"),
    ("optimizer.lr=1e308", "optimizer.lr: must be within float32's range, [-3.4028235e+38, 3.4028235e+38], got 1e+308"),
    ("optimizer.lr=3.5e38", "optimizer.lr: must be within float32's range, [-3.4028235e+38, 3.4028235e+38], got 3.5e+38"),
    ("optimizer.lr=1" + "0" * 400,
     "optimizer.lr: must be within float32's range, [-3.4028235e+38, 3.4028235e+38], got an integer of 401 digits (100000...)"),
    ("optimizer.weight_decay=1e39",
     "optimizer.weight_decay: must be within float32's range, [-3.4028235e+38, 3.4028235e+38], got 1e+39"),
    ("run.epochs=1000000000000000000000",
     "run.epochs: must be a 64-bit integer, in [-9223372036854775808, 9223372036854775807], got 1000000000000000000000"),
    ("run.epochs=1000001", "run.epochs: must be <= 1000000, got 1000001"),
    ("schedule.warmup_epochs=1e9", "schedule.warmup_epochs: must be <= 1000000, got 1000000000.0"),
    ("data.workers=100000000000", "data.workers: must be <= 1024, got 100000000000"),
    ("distributed.timeout_s=1e30", "distributed.timeout_s: must be <= 1000000000, got 1e+30"),
])
def test_numbers_a_run_cannot_take_are_refused_in_validation(capsys, setting, line):
    key = setting.partition("=")[0]
    assert validate_lines(capsys, DIGITS, setting) == ["2", f"error: {DIGITS}: {line} (from --set {key})"]


@pytest.mark.parametrize("setting", [
    "run.seed=9223372036854775807", "run.seed=-9223372036854775808", "data.split_seed=4294967295",
    "optimizer.lr=3.4e38", "run.epochs=1000000", "schedule.warmup_epochs=1000000", "data.workers=1024",
])
def test_the_ends_of_each_range_are_allowed(capsys, setting):
    code, *lines = validate_lines(capsys, DIGITS, setting)
    assert (code, lines) == ("0", [])


def test_list_items_are_bounded_too(capsys, write_recipe):
    path = write_recipe(tiny_recipe_text(""))
    assert validate_lines(capsys, path, "data.shape=[3, 8, 9223372036854775808]") == [
        "2", f"error: {path}: data.shape: item 2: must be a 64-bit integer, in [-9223372036854775808, "
             f"9223372036854775807], got 9223372036854775808 (from --set data.shape)"]


def test_a_plugins_options_get_the_bounds_without_declaring_them():
    """Third-party Options classes need no validators for the limits every number has."""

    @attrs.frozen
    class Options:
        count: int = option(1, doc="a count")
        scale: float = option(1.0, doc="a scale")

    options, problems = structure(Options, {"count": 2**63, "scale": 1e39}, "x.toml: thing")
    assert options is None
    assert problems == [
        "x.toml: thing.count: must be a 64-bit integer, in [-9223372036854775808, 9223372036854775807], got 9223372036854775808",
        "x.toml: thing.scale: must be within float32's range, [-3.4028235e+38, 3.4028235e+38], got 1e+39",
    ]
    assert structure(Options, {"count": 2**63 - 1, "scale": -3.4e38}, "x.toml: thing")[1] == []


def test_a_run_failing_at_its_first_step_leaves_no_run_directory(tmp_path, capsys):
    """A weight decay within float32's range still makes the first step's parameters infinite:
    the run stops with one line, and the same command works once the recipe is fixed."""
    out = tmp_path / "run"
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_recipe_text(out, epochs=1, train_size=16))
    with pytest.raises(ContsupError, match="became n"):
        api.train(path, ["optimizer.weight_decay=3e38"])
    assert not out.exists()
    run = api.train(path)
    assert run.run_dir == out and (out / "model.pt").exists()

"""A run whose first step cannot fit in the machine's memory is refused before it starts: one
line, exit 2, no run directory, estimated from shapes alone (nothing of its size allocated)."""

from __future__ import annotations

import re

import pytest
import torch

import contsup.training.memory_fit as fit
from contsup.cli import main
from contsup.tools.plan import plan_data
from contsup.training.memory_fit import check_fits, estimate_need

from conftest import ROOT, small_recipe_text

SMALL_MACHINE = 8 * 10**9  # what the tests pretend is available: 8 GB


@pytest.fixture
def small_machine(monkeypatch):
    monkeypatch.setattr(fit, "available_memory", lambda device: (SMALL_MACHINE, "available (RAM)"))


def refused(write_recipe, tmp_path, capsys, text):
    out_dir = tmp_path / "run"
    path = write_recipe(text.replace('out_dir = ""', f'out_dir = "{out_dir}"'))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not out_dir.exists()  # refused before the run directory is made
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


def test_a_huge_input_is_refused_in_one_line(small_machine, write_recipe, tmp_path, capsys):
    text = small_recipe_text().replace("shape = [3, 16, 16]", "shape = [3, 100000, 100000]")
    line = refused(write_recipe, tmp_path, capsys, text)
    assert re.match(r"error: module \d needs about [\d,]+ GB for one batch of 16 \(activations kept for backward", line)
    assert "this machine has 8.0 GB available (RAM); lower data.batch_size (or the input's size) or raise partition.modules" in line


def test_a_huge_head_is_refused_naming_the_parameters(small_machine, write_recipe, tmp_path, capsys):
    text = small_recipe_text().replace("shape = [3, 16, 16]", "shape = [3, 16, 16]\nclasses = 1000000000")
    line = refused(write_recipe, tmp_path, capsys, text)
    assert "needs about" in line and "the parameters alone are too many" in line


def test_digits_at_4096_pixels_is_refused(small_machine, write_recipe, tmp_path, capsys):
    digits = (ROOT / "recipes" / "digits.toml").read_text()
    text = digits.replace("\nsize = 8\n", "\nsize = 4096\n").replace("batch_size = 32", "batch_size = 64")
    assert text.count("4096") == 1 and "batch_size = 64" in text  # the recipe's lines as this test knows them
    line = refused(write_recipe, tmp_path, capsys, text.replace("[run]\n", '[run]\nout_dir = ""\n'))
    assert "for one batch of 64" in line and "lower data.batch_size" in line


def test_a_tiny_recipe_fits_and_trains(write_recipe, tmp_path, capsys):
    out_dir = tmp_path / "run"
    path = write_recipe(small_recipe_text(out_dir=str(out_dir), train_size=16, batch_size=8))
    assert main(["train", str(path)]) == 0
    assert (out_dir / "model.pt").exists()


def test_the_estimate_is_the_plans_largest_module_plus_weights(small_recipe):
    """The activations counted are the plan's (the exact saved-tensor count); parameters are
    the network's, gradients and SGD's momentum one buffer each of the module's own."""
    recipe = small_recipe(modules=4, context="R1E", batch_size=8)
    need = estimate_need(recipe)
    data = plan_data(recipe)
    weights = 4 * sum(m["params"] for m in data["modules"])
    expected = {m["index"]: m["memory"]["bytes"] + weights + 4 * 2 * m["params"] for m in data["modules"]}  # momentum 0.9
    worst = max(data["modules"], key=lambda m: expected[m["index"]])
    assert need.what == f"module {worst['index']}" and need.activations == worst["memory"]["bytes"]
    assert need.parameters == weights and need.bytes == expected[worst["index"]]
    assert check_fits(recipe, torch.device("cpu"), lambda device: (need.bytes, "available")) == need
    with pytest.raises(fit.ContsupError, match=f"module {worst['index']} needs about"):
        check_fits(recipe, torch.device("cpu"), lambda device: (need.bytes - 1, "available"))


def test_an_estimate_that_cannot_be_made_never_stops_a_run(small_recipe, monkeypatch):
    def fails(recipe):
        raise RuntimeError("cannot follow this recipe")

    monkeypatch.setattr(fit, "estimate_need", fails)
    assert check_fits(small_recipe(), torch.device("cpu"), lambda device: (0, "available")) is None


def test_recompute_is_what_lets_a_run_fit(small_recipe, monkeypatch, write_recipe, tmp_path, capsys):
    """The estimate leaves out what context.recompute (recompute_head) makes again in backward: a
    machine between the two figures refuses the run with the adapters' activations kept and
    starts it with them recomputed."""
    context = 'R1E"\nrecompute = true\nrecompute_head = true\n#'
    kept, lean = (estimate_need(small_recipe(modules=4, context=c, batch_size=16)) for c in ("R1E", context))
    assert lean.bytes < kept.bytes and lean.parameters == kept.parameters
    text, recompute = (small_recipe_text(modules=4, context=c, batch_size=16) for c in ("R1E", context))
    between = (lean.bytes + kept.bytes) // 2
    monkeypatch.setattr(fit, "available_memory", lambda device: (between, "available (RAM)"))
    assert "needs about" in refused(write_recipe, tmp_path, capsys, text)
    out_dir = tmp_path / "lean"
    path = write_recipe(recompute.replace('out_dir = ""', f'out_dir = "{out_dir}"'), "lean-run.toml")
    monkeypatch.setattr(fit, "available_memory", lambda device: (between, "available (RAM)"))
    assert main(["train", str(path), "--set", "run.epochs=1"]) == 0

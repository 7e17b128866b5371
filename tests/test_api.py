"""The Python API (contsup/api.py): train, load_recipe, build_network, evaluate and load_model from
a script, giving what the command line gives."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import contsup
from contsup.cli import main
from contsup.errors import ContsupError, RecipeError
from contsup.model.network import GreedyNetwork
from contsup.training.rundir import read_metrics

from tiny import assert_same_runs, one_thread, tiny_recipe_text, without_measured  # noqa: F401 (fixture)


@pytest.fixture
def recipe_file(write_recipe, tmp_path):
    return write_recipe(tiny_recipe_text(tmp_path / "unused", epochs=2))


def test_the_api_is_exported_from_the_package():
    assert set(contsup.__all__) >= {"train", "load_recipe", "build_network", "evaluate", "load_model", "Run"}
    assert contsup.train is contsup.api.train


def test_importing_contsup_loads_no_torch():
    code = "import sys, contsup; print(json.dumps(sorted(m for m in ('torch', 'timm') if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_train_returns_the_run_it_wrote(recipe_file, tmp_path, capsys):
    run = contsup.train(recipe_file, overrides=["run.epochs=1"], out_dir=tmp_path / "api")
    assert run.run_dir == tmp_path / "api" and (run.run_dir / "model.pt").exists()
    assert isinstance(run.model, GreedyNetwork) and run.recipe.run.epochs == 1
    assert [m["epoch"] for m in run.history] == [1] and run.final is run.history[-1] and run.best is run.history[-1]
    assert without_measured(read_metrics(run.run_dir)) == without_measured(run.history)
    assert run.summary() in capsys.readouterr().out  # the same last line contsup train prints
    saved = torch.load(run.run_dir / "model.pt", weights_only=True)
    for key, value in run.model.state_dict().items():
        assert torch.equal(saved[key], value.cpu()), key


def test_the_api_and_the_command_train_the_same_run(recipe_file, tmp_path):
    contsup.train(recipe_file, out_dir=tmp_path / "api")
    assert main(["train", str(recipe_file), "--set", f"run.out_dir=\"{tmp_path / 'cli'}\""]) == 0
    assert_same_runs(tmp_path / "api", tmp_path / "cli")


def test_a_loaded_recipe_trains_with_overrides(recipe_file, tmp_path):
    recipe = contsup.load_recipe(recipe_file, ["run.epochs=1"])
    assert recipe.run.epochs == 1
    run = contsup.train(recipe, overrides=["run.seed=3"], out_dir=tmp_path / "r")
    assert run.recipe.run.seed == 3 and len(run.history) == 1
    with pytest.raises(RecipeError, match="run.epochs"):
        contsup.train(recipe, overrides=["run.epochs=0"], out_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_resume_through_the_api_continues_the_run(recipe_file, tmp_path):
    first = contsup.train(recipe_file, overrides=["run.epochs=1"], out_dir=tmp_path / "split")
    with pytest.raises(ContsupError, match="already finished its 1 epochs"):
        contsup.train(resume=first.run_dir)
    resumed = contsup.train(resume=first.run_dir, overrides=["run.epochs=2"], force=True)
    assert [m["epoch"] for m in resumed.history] == [1, 2]
    assert resumed.history[0] == first.history[0] and read_metrics(first.run_dir) == resumed.history


def test_problems_are_the_errors_the_command_prints(recipe_file, tmp_path):
    with pytest.raises(ContsupError, match="give a recipe file, or --resume"):
        contsup.train()
    with pytest.raises(ContsupError, match="no such run directory"):
        contsup.train(resume=tmp_path / "nowhere")
    contsup.train(recipe_file, overrides=["run.epochs=1"], out_dir=tmp_path / "once")
    with pytest.raises(ContsupError, match="already exists"):
        contsup.train(recipe_file, overrides=["run.epochs=1"], out_dir=tmp_path / "once")
    assert contsup.train(recipe_file, overrides=["run.epochs=1"], out_dir=tmp_path / "once", new=True).run_dir.name == "once-2"


def test_build_network_is_the_network_a_run_starts_from(recipe_file):
    a, b = contsup.build_network(recipe_file), contsup.build_network(contsup.load_recipe(recipe_file))
    assert isinstance(a, GreedyNetwork) and a.num_modules == 3
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert contsup.build_network(recipe_file, ["partition.modules=2"]).num_modules == 2


def test_evaluate_and_load_model_agree_with_the_run(recipe_file, tmp_path):
    run = contsup.train(recipe_file, overrides=["run.epochs=1"], out_dir=tmp_path / "e")
    report = contsup.evaluate(run)
    assert report["test_error_pct"] == pytest.approx(run.final["test_error_pct"])
    assert contsup.evaluate(run.run_dir)["local_acc_pct"] == report["local_acc_pct"]
    model = contsup.load_model(run.run_dir)
    assert not model.training
    given = contsup.evaluate(model, recipe=run.recipe)
    assert given["test_error_pct"] == pytest.approx(report["test_error_pct"]) and given["run_dir"] is None
    with pytest.raises(TypeError, match="recipe="):
        contsup.evaluate(model)


def test_the_api_page_runs_as_written(recipe_file, tmp_path, monkeypatch):
    """Every Python block of docs/api.md, in order, on a tiny recipe instead of the digits one."""
    import re

    from conftest import ROOT

    page = (ROOT / "docs" / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert len(blocks) == 4
    monkeypatch.chdir(tmp_path)
    code = "\n".join(blocks).replace("recipes/digits.toml", str(recipe_file))
    exec(compile(code, "docs/api.md", "exec"), {})
    assert (tmp_path / "runs" / "notebook-r1e" / "model.pt").exists() and (tmp_path / "runs" / "notebook-none").is_dir()


def test_overriding_a_loaded_recipes_component_starts_its_table_afresh(recipe_file):
    recipe = contsup.load_recipe(recipe_file)  # context R1E: its table holds input = true, recent = 1
    from contsup.core.registry import load_registries
    from contsup.training.start import recipe_from

    _, registries = load_registries()
    dgl = recipe_from(recipe, ['context.use="none"'], registries)
    assert dgl.context.use == "none" and recipe.context.use == "R1E"
    same = recipe_from(recipe, ['context.use="R1E"', "optimizer.lr=0.2"], registries)
    assert same.table()["context"] == recipe.table()["context"] and same.optimizer.options.lr == 0.2

"""Recipes: every kind of problem gives one line naming file and key, all problems together,
exit status 2, never a traceback; --set and extends; every shipped recipe validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from contsup.cli import main
from contsup.errors import RecipeError
from contsup.config.recipe import load_recipe, loads_recipe

from conftest import ROOT, small_recipe_text

RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.toml") if not p.name.endswith(".sweep.toml"))
SWEEPS = sorted((ROOT / "recipes").rglob("*.sweep.toml"))


def run_validate(path: Path, *extra: str, capsys) -> tuple[int, list[str]]:
    code = main(["validate", str(path), *extra])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, [line for line in err.splitlines() if line]


@pytest.mark.parametrize(
    "change, expected",
    [
        (("[optimizer]\nlr = 0.05", "[optimizer]\nlrr = 0.05"), "optimizer.lrr: unknown key for optimizer 'sgd'; did you mean 'lr'?"),
        (('shape = [3, 16, 16]', 'shape = "big"'), "data.shape: expected a list of integers, got a string"),
        (("epochs = 1", 'epochs = "one"'), "run.epochs: expected an integer, got a string (\"one\")"),
        (("epochs = 1", "epochs = 0"), "run.epochs: must be >= 1, got 0"),
        (("[optimizer]\nlr = 0.05", "[optimizer]\nlr = -1"), "optimizer.lr: must be > 0, got -1.0"),
        (('use = "cifar_resnet20"', 'use = "cifar_resnet21"'), "backbone.use: unknown backbone 'cifar_resnet21'; did you mean 'cifar_resnet20'?"),
        (("modules = 4", "modules = 11"), "partition.modules: 11 is more than the 10 minimal units of backbone 'cifar_resnet20'; use 1..10"),
        (('use = "R1E"', 'use = "R1X"'), "context.use: unknown context selector 'R1X'; did you mean 'R1'?"),
        (('mode = "greedy"', 'mode = "greedyy"'), "run.mode: 'greedyy' is not allowed; did you mean 'greedy'?"),
        (("[run]", "[rnu]"), "rnu: unknown section; did you mean 'run'?"),
        (("lr = 0.05", "lr = 0.05\nmomentum = 0"), "optimizer.momentum: must be > 0 while nesterov = true, got 0.0; raise it, or set nesterov = false"),
        (('mode = "greedy"', 'mode = "greedy"\ndevice = "gpu"'), "run.device: 'gpu' is not a device;"),
    ],
)
def test_each_problem_is_one_line_with_file_key_and_fix(write_recipe, capsys, change, expected):
    text = small_recipe_text()
    old, new = change
    assert old in text
    path = write_recipe(text.replace(old, new, 1))
    code, lines = run_validate(path, capsys=capsys)
    assert code == 2
    assert any(line == f"error: {path}: {expected}" or line.startswith(f"error: {path}: {expected}") for line in lines), lines


def test_all_problems_are_reported_together(write_recipe, capsys):
    text = small_recipe_text().replace("epochs = 1", "epochs = 0").replace("lr = 0.05", "lr = 0.05\nmomentun = 0.9")
    text = text.replace('use = "R1E"', 'use = "RE1"')
    code, lines = run_validate(write_recipe(text), capsys=capsys)
    assert code == 2
    assert len(lines) == 3
    assert any("run.epochs" in l for l in lines) and any("momentun" in l for l in lines) and any("RE1" in l for l in lines)


def test_cross_field_problems_name_their_key_path_and_the_set_behind_them(write_recipe, capsys):
    path = write_recipe(small_recipe_text())
    code, lines = run_validate(path, "--set", "optimizer.momentum=0", "--set", "run.device=gpu", capsys=capsys)
    assert code == 2
    assert lines == [
        f"error: {path}: run.device: 'gpu' is not a device; use \"auto\", \"cpu\", \"cuda\" or \"cuda:N\" (from --set run.device)",
        f"error: {path}: optimizer.momentum: must be > 0 while nesterov = true, got 0.0; raise it, or set nesterov = false "
        "(from --set optimizer.momentum)",
    ]


def test_k_against_the_backbone_is_checked_beside_unrelated_problems(write_recipe, capsys):
    path = write_recipe(small_recipe_text())
    code, lines = run_validate(path, "--set", "partition.modules=40", "--set", "optimizer.lr=-1", capsys=capsys)
    assert code == 2
    assert lines == [
        f"error: {path}: optimizer.lr: must be > 0, got -1.0 (from --set optimizer.lr)",
        f"error: {path}: partition.modules: 40 is more than the 10 minimal units of backbone 'cifar_resnet20'; "
        "use 1..10 (from --set partition.modules)",
    ]
    # without a valid backbone there is nothing to count K against: no second guess
    code, lines = run_validate(path, "--set", "partition.modules=40", "--set", "backbone.use=nope", capsys=capsys)
    assert code == 2 and len(lines) == 1 and "backbone.use: unknown backbone 'nope'" in lines[0]


def test_malformed_toml_and_garbage_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nseed = 1\n")
    code, lines = run_validate(bad, capsys=capsys)
    assert code == 2 and len(lines) == 1 and "not valid TOML" in lines[0] and str(bad) in lines[0]
    garbage = tmp_path / "garbage.toml"
    garbage.write_bytes(b"\xff\xfe\x00binary")
    code, lines = run_validate(garbage, capsys=capsys)
    assert code == 2 and len(lines) == 1 and "not a text file" in lines[0]
    code, lines = run_validate(tmp_path / "missing.toml", capsys=capsys)
    assert code == 2 and "no such recipe file" in lines[0]


def test_missing_required_use(write_recipe, capsys):
    path = write_recipe(small_recipe_text().replace('use = "cifar_resnet20"', ""))
    code, lines = run_validate(path, capsys=capsys)
    assert code == 2
    assert lines == [f"error: {path}: backbone.use: missing required key (the backbone to use)"]


def test_preset_options_conflict_with_explicit_ones(registries):
    with pytest.raises(RecipeError) as err:
        loads_recipe(small_recipe_text().replace('use = "R1E"', 'use = "R1E"\nrecent = 2'), registries)
    assert "context.recent: conflicts with use = \"R1E\", which sets recent = 1" in str(err.value)
    # the same value is fine, and the 'contsup' name with options equals the shorthand
    named = loads_recipe(small_recipe_text().replace('use = "R1E"', 'use = "R1E"\nrecent = 1'), registries)
    spelled = loads_recipe(
        small_recipe_text().replace('use = "R1E"', 'use = "contsup"\ninput = true\nrecent = 1'), registries
    )
    assert named.context.options == spelled.context.options


def test_set_overrides_any_key(write_recipe, registries):
    path = write_recipe(small_recipe_text())
    recipe = load_recipe(path, ["optimizer.lr=0.5", "context.use=E", "run.device=cpu", "data.shape=[1, 8, 8]"], registries)
    assert recipe.optimizer.options.lr == 0.5
    assert recipe.context.use == "E" and recipe.context.options.input and recipe.context.options.recent == 0
    assert recipe.run.device == "cpu"
    assert recipe.dataset.options.shape == (1, 8, 8)


def test_bad_set_values_are_reported(write_recipe, capsys):
    path = write_recipe(small_recipe_text())
    code, lines = run_validate(path, "--set", "run.epochs=many", "--set", "noequals", "--set", ".lr=1", capsys=capsys)
    assert code == 2
    assert lines == [
        "error: --set noequals: expected key.path=value",
        "error: --set .lr=1: '.lr' is not a key path like optimizer.lr",
        f"error: {path}: run.epochs: expected an integer, got a string (\"many\") (from --set run.epochs)",
    ]
    code, lines = run_validate(path, "--set", "noequals", capsys=capsys)
    assert code == 2 and lines == ["error: --set noequals: expected key.path=value"]
    code, lines = run_validate(path, "--set", "run.epochs=many", capsys=capsys)
    assert code == 2 and lines[0].endswith("(from --set run.epochs)") and "run.epochs: expected an integer" in lines[0]


def test_extends_inherits_and_overrides(tmp_path, registries):
    (tmp_path / "base.toml").write_text(small_recipe_text())
    child = tmp_path / "child.toml"
    child.write_text('extends = "base.toml"\n[partition]\nmodules = 2\n[context]\nuse = "E"\n')
    recipe = load_recipe(child, (), registries)
    assert recipe.partition.modules == 2 and recipe.context.use == "E"
    assert recipe.dataset.options.shape == (3, 16, 16)
    loop = tmp_path / "loop.toml"
    loop.write_text('extends = "loop.toml"\n')
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(loop, (), registries)


def test_resolved_recipe_round_trips(tmp_path, registries, small_recipe):
    from contsup.core import tomlw

    recipe = small_recipe()
    path = tmp_path / "resolved.toml"
    path.write_text(tomlw.dumps(recipe.table()))
    again = load_recipe(path, (), registries)
    assert again.table() == recipe.table()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_validates(path, capsys):
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_sweep_validates(path, registries):
    from contsup.tools.sweep import check_runs, load_sweep

    sweep = load_sweep(path)
    assert sweep.runs() and check_runs(sweep, registries) == []


@pytest.mark.parametrize("path", RECIPES + SWEEPS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_starts_with_its_command(path):
    first = path.read_text().splitlines()[0]
    rel = path.relative_to(ROOT)
    assert first.startswith(("# contsup ", "# torchrun ")) and str(rel) in first, first

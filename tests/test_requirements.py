"""run.requires: a recipe names the plugin distributions it needs and gets one "missing required
plugin" problem per unmet requirement, with the installed version, before anything runs."""

from __future__ import annotations

import pytest

from contsup.core import requirements
from contsup.cli import main
from contsup.errors import RecipeError
from contsup.core.plugins import PluginInfo
from contsup.config.recipe import loads_recipe
from contsup.core.requirements import check_requirements, parse

from conftest import small_recipe_text

PLUGINS = {
    "contsup_context": PluginInfo("contsup_context", "contsup", "0.1.0", builtin=True),
    "geometric": PluginInfo("geometric", "contsup-geometric", "0.2.0", builtin=False, entry_point="contsup_geometric"),
}
WHERE = "r.toml: run.requires"


def check(*requires: str) -> list[str]:
    return check_requirements(requires, PLUGINS, WHERE)


def test_met_requirements_give_no_problem():
    assert check("contsup-geometric>=0.1", "contsup-geometric==0.2.0", "contsup", "contsup>=0.1,<1") == []
    assert check("Contsup_Geometric>=0.2") == []  # names compare as pip compares them


def test_too_old_says_what_is_installed():
    assert check("contsup-geometric>=0.3") == [
        f"{WHERE}[0]: missing required plugin 'contsup-geometric>=0.3': contsup-geometric 0.2.0 is installed, "
        "which is not >=0.3 (pip install 'contsup-geometric>=0.3')"
    ]


def test_not_installed():
    assert check("contsup", "contsup-nowhere-to-be-found>=1") == [
        f"{WHERE}[1]: missing required plugin 'contsup-nowhere-to-be-found>=1': contsup-nowhere-to-be-found is not "
        "installed (pip install 'contsup-nowhere-to-be-found>=1')"
    ]


def test_installed_but_not_a_loaded_plugin(monkeypatch):
    monkeypatch.delenv("CONTSUP_LOAD_PLUGINS", raising=False)
    (line,) = check("pluggy>=1")
    assert line.endswith("is installed but loads no contsup plugin (it has no entry point in the 'contsup' group)")
    monkeypatch.setattr(requirements, "_has_entry_points", lambda name: True)
    monkeypatch.setenv("CONTSUP_LOAD_PLUGINS", "other")
    (line,) = check("pluggy>=1")
    assert line.endswith("loads no contsup plugin (CONTSUP_LOAD_PLUGINS='other' leaves it out)")


@pytest.mark.parametrize("text", ["contsup geometric", "contsup-geometric>>1", "contsup-geometric[extra]>=1", "x @ https://example.org/x.whl", ""])
def test_malformed_requirements_are_problems_too(text):
    with pytest.raises(ValueError, match="contsup-geometric>=0.1"):
        parse(text)
    (line,) = check(text)
    assert line.startswith(f"{WHERE}[0]: '{text}'")


def test_a_recipe_reports_missing_plugins_first_with_its_other_problems(registries):
    text = small_recipe_text(context="geometric") + "\n"
    text = text.replace("[run]\n", '[run]\nrequires = ["contsup-geometric>=0.1", "contsup>=0.1"]\n')
    with pytest.raises(RecipeError) as err:
        loads_recipe(text, registries, source="r.toml")
    problems = err.value.problems
    assert problems[0].startswith("r.toml: run.requires[0]: missing required plugin 'contsup-geometric>=0.1': ")
    assert problems[1].startswith("r.toml: context.use: unknown context selector 'geometric'")
    assert len(problems) == 2


def test_requires_must_be_a_list_of_strings(registries):
    text = small_recipe_text().replace("[run]\n", '[run]\nrequires = "contsup"\n')
    with pytest.raises(RecipeError, match=r"r.toml: run.requires: expected a list of strings, got a string"):
        loads_recipe(text, registries, source="r.toml")


def test_met_requirements_are_kept_in_the_resolved_recipe(registries):
    text = small_recipe_text().replace("[run]\n", '[run]\nrequires = ["contsup>=0.1"]\n')
    recipe = loads_recipe(text, registries, source="r.toml")
    assert recipe.run.requires == ("contsup>=0.1",)
    assert recipe.table()["run"]["requires"] == ["contsup>=0.1"]


def test_train_stops_before_anything_runs(write_recipe, tmp_path, capsys):
    out_dir = tmp_path / "run"
    text = small_recipe_text(out_dir=str(out_dir)).replace("[run]\n", '[run]\nrequires = ["contsup>=99"]\n')
    assert main(["train", str(write_recipe(text))]) == 2
    err = capsys.readouterr().err
    assert "missing required plugin 'contsup>=99': contsup " in err and "Traceback" not in err
    assert not out_dir.exists()

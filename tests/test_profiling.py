"""``contsup profile``: per-unit and per-module tables that add up, and a peak above its bound."""

from __future__ import annotations

import json

from contsup.cli import main

from conftest import small_recipe_text


def test_profile_json_adds_up(write_recipe, capsys):
    path = write_recipe(small_recipe_text(modules=4, context="R1E", batch_size=4))
    assert main(["profile", str(path), "--json", "--repeats", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "saved" and data["modules_k"] == 4 and len(data["units"]) == 10
    assert sum(u["bytes"] for u in data["units"]) == data["total_unit_bytes"]
    assert abs(sum(u["bytes_share"] for u in data["units"]) - 1) < 1e-9
    assert abs(sum(m["bytes_share"] for m in data["modules"]) - 1) < 1e-9
    assert [m["units"] for m in data["modules"]] == [2, 2, 3, 3]
    for m in data["modules"]:
        assert m["bytes"] == sum(m["breakdown"].values()) and m["ms"] > 0
    peak = max(m["bytes"] for m in data["modules"])
    assert data["predicted_peak_bytes"] == peak >= data["lower_bound_bytes"]
    assert data["lower_bound_bytes"] == max(data["largest_unit_bytes"], data["total_unit_bytes"] / 4)
    assert data["modules"][1]["sources"] == ["x", "h0"]


def test_profile_text_names_the_peak_and_the_bound(write_recipe, capsys):
    path = write_recipe(small_recipe_text(modules=2, context="none", batch_size=2))
    assert main(["profile", str(path), "--repeats", "1", "--set", "partition.use=memory_balanced"]) == 0
    out = capsys.readouterr().out
    assert "per unit:" in out and "per module" in out
    assert "predicted peak:" in out and "lower bound max(largest unit" in out


def test_profile_refuses_zero_repeats(write_recipe, capsys):
    path = write_recipe(small_recipe_text())
    assert main(["profile", str(path), "--repeats", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--repeats must be >= 1" in err


def test_profile_sources_are_each_modules_own_as_plan_shows_them(write_recipe, capsys):
    hybrid = '\n[[modules]]\nrange = [1, 2]\ncontext = { use = "none" }\n\n[[modules]]\nrange = [3, 4]\ncontext = { use = "R1E" }\n'
    path = write_recipe(small_recipe_text(modules=4, context="E", batch_size=2) + hybrid)
    assert main(["plan", str(path), "--json"]) == 0
    planned = [m["sources"] for m in json.loads(capsys.readouterr().out)["modules"]]
    assert main(["profile", str(path), "--json", "--repeats", "1"]) == 0
    profiled = json.loads(capsys.readouterr().out)["modules"]
    assert [m["sources"] for m in profiled] == planned == [[], [], ["x", "h1"], ["x", "h2"]]
    assert [m["breakdown"]["adapters"] > 0 for m in profiled] == [False, False, True, True]

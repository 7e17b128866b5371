"""Hybrid schemes: [[modules]] ranges must tile 1..K; each range gets its own components."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contsup.errors import RecipeError
from contsup.model.network import build_network
from contsup.config.recipe import loads_recipe
from contsup.config.validation import check_tiling

from conftest import small_recipe_text


@st.composite
def tilings(draw):
    k = draw(st.integers(1, 40))
    cuts = sorted(draw(st.sets(st.integers(1, k - 1), max_size=k - 1))) if k > 1 else []
    bounds = [0, *cuts, k]
    ranges = [(a + 1, b) for a, b in zip(bounds[:-1], bounds[1:])]
    return k, draw(st.permutations(ranges))


@given(tilings())
def test_valid_tilings_are_accepted(case):
    k, ranges = case
    assert check_tiling(ranges, k) == []


@given(tilings(), st.data())
def test_gaps_and_overlaps_are_rejected(case, data):
    k, ranges = case
    ranges = sorted(ranges)
    i = data.draw(st.integers(0, len(ranges) - 1))
    first, last = ranges[i]
    if data.draw(st.booleans()) and len(ranges) > 1:
        broken = ranges[:i] + ranges[i + 1 :]  # drop one range: a gap
        assert any("no range covers" in p for p in check_tiling(broken, k))
    elif i + 1 < len(ranges):
        broken = list(ranges)
        broken[i] = (first, ranges[i + 1][0])  # grow into the next: an overlap
        assert any("overlap" in p for p in check_tiling(broken, k))


def test_messages_name_the_ranges():
    assert check_tiling([(1, 3), (3, 5)], 5) == ["ranges [1, 3] and [3, 5] overlap"]
    assert check_tiling([(1, 2), (5, 6)], 6) == ["no range covers modules 3..4"]
    assert check_tiling([(1, 2)], 4) == ["no range covers modules 3..4 (partition.modules = 4)"]
    assert check_tiling([(1, 5)], 4) == ["range [1, 5] goes past the last module (partition.modules = 4)"]


HYBRID = """
[[modules]]
range = [1, 2]
context = { use = "none", encoder = "paper", shortcut = "paper" }

[[modules]]
range = [3, 5]
context = { use = "R1E" }
objective = { use = "supcon", temperature = 0.1 }
"""


def test_each_range_gets_its_components(registries):
    recipe = loads_recipe(small_recipe_text(modules=5, context="E") + HYBRID, registries)
    built = build_network(recipe)
    assert [[str(s) for s in p.sources] for p in built.plans] == [[], [], ["x", "h1"], ["x", "h2"], ["x", "h3"]]
    names = [type(m.objective).__name__ for m in built.network.blocks]
    assert names == ["CrossEntropy", "CrossEntropy", "SupCon", "SupCon", "FinalCrossEntropy"]
    assert recipe.module_range(4).objective.options.temperature == 0.1
    table = recipe.table()
    assert table["modules"][0] == {"range": [1, 2], "context": {"use": "none", "input": False, "recent": 0, "intermediate": 0, "dense": False, "encoder": "paper", "shortcut": "paper", "input_once": False, "start": 0.1}}


def test_bad_ranges_are_recipe_errors(registries):
    text = small_recipe_text(modules=5) + HYBRID.replace("range = [3, 5]", "range = [2, 4]")
    with pytest.raises(RecipeError) as err:
        loads_recipe(text, registries, source="h.toml")
    assert err.value.problems == (
        "h.toml: modules: ranges [1, 2] and [2, 4] overlap",
        "h.toml: modules: no range covers module 5 (partition.modules = 5)",
    )
    text = small_recipe_text(modules=5) + HYBRID.replace('use = "supcon"', 'use = "supcom"').replace("range = [1, 2]", "rnage = [1, 2]")
    with pytest.raises(RecipeError) as err:
        loads_recipe(text, registries, source="h.toml")
    problems = "\n".join(err.value.problems)
    assert "h.toml: modules[0].rnage: unknown key; did you mean 'range'?" in problems
    assert "h.toml: modules[0].range: expected [first, last]" in problems
    assert "h.toml: modules[1].objective.use: unknown objective 'supcom'; did you mean 'supcon'?" in problems

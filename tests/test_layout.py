"""Selectors that see the network: NetworkLayout, layout-aware sources, the `stage` selector,
contsup.testing's layout helpers and the fuller `contsup plan` (issue 16)."""

from __future__ import annotations

import json

import attrs
import pytest
from hypothesis import given, settings

from contsup.cli import main
from contsup.errors import ContsupError
from contsup.model.components import selector_sources, takes_layout
from contsup.model.network import build_network, check_sources, network_layout, plan_modules
from contsup.testing import chain_layout, check_selector, preview_sources, recipe as load_test_recipe
from contsup.testing.strategies import layouts
from contsup.types import Costs, ModuleLayout, NetworkLayout, Source
from contsup_context import ContSup, StageSelector, stage_sources

from conftest import ROOT, small_recipe_text

# ResNet-32 on CIFAR's 3x32x32, cut into 16 one-unit modules, as the issue states it.
CIFAR_K16 = """
[data]
use = "synthetic"
shape = [3, 32, 32]
classes = 10

[backbone]
use = "cifar_resnet32"

[partition]
use = "uniform"
modules = 16

[context]
use = "{context}"
"""

STAGE_CIFAR_K16 = {
    1: (), 2: ("x",),
    **{l: ("x", "h1") for l in range(3, 8)},
    8: ("x",),
    **{l: ("x", "h7") for l in range(9, 13)},
    13: ("x",),
    **{l: ("x", "h12") for l in range(14, 17)},
}

RESNET32_UNITS = [(16, 32, 32)] * 6 + [(32, 16, 16)] * 5 + [(64, 8, 8)] * 5


def test_layout_of_a_split():
    layout = NetworkLayout.from_split((3, 32, 32), RESNET32_UNITS, [4, 4, 4, 4])
    assert layout.num_modules == 4
    assert layout.stages == ((0, 5), (6, 10), (11, 15))
    assert layout.module(1) == ModuleLayout(1, (0, 3), (3, 32, 32), (16, 32, 32), 0)
    assert layout.module(2) == ModuleLayout(2, (4, 7), (16, 32, 32), (32, 16, 16), 1)
    assert layout.module(3) == ModuleLayout(3, (8, 11), (32, 16, 16), (64, 8, 8), 2)
    assert layout.module(4).stage == 3 and layout.module(4).units == 4
    assert layout.feature_shape(0) == (3, 32, 32) and layout.feature_shape(2) == (32, 16, 16)
    assert layout.source_shape(Source.input()) == (3, 32, 32) and layout.source_shape(Source.feature(1)) == (16, 32, 32)
    with pytest.raises(IndexError, match="modules are 1..4"):
        layout.module(5)
    with pytest.raises(ValueError, match="summing to 16"):
        NetworkLayout.from_split((3, 32, 32), RESNET32_UNITS, [4, 4])
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        layout.stages = ()  # type: ignore[misc]


@settings(max_examples=200, deadline=None)
@given(layouts(max_units=24))
def test_any_layout_follows_its_split(layout):
    """Modules cover the units in order; each takes the previous one's output; stages never go back;
    a partitioner's Costs with the same shapes gives the same layout and stages."""
    modules, n = layout.modules, len(layout.unit_shapes)
    assert modules[0].unit_range[0] == 0 and modules[-1].unit_range[1] == n - 1
    assert modules[0].input_shape == layout.input_shape and modules[0].stage == 0
    for a, b in zip(modules, modules[1:]):
        assert b.unit_range[0] == a.unit_range[1] + 1 and b.input_shape == a.output_shape and b.stage >= a.stage >= 0
        first, last = layout.stages[b.stage - 1]
        assert first <= b.unit_range[0] - 1 <= last  # the stage of b's input is the stage of a's last unit
    assert all(m.output_shape == layout.unit_shapes[m.unit_range[1]] for m in modules)
    costs = attrs.evolve(Costs.uniform(n), input_shape=layout.input_shape, unit_shapes=layout.unit_shapes)
    assert costs.stages == layout.stages and costs.layout([m.units for m in modules]) == layout
    assert costs.unit_input_shape(modules[-1].unit_range[0]) == modules[-1].input_shape


@settings(max_examples=100, deadline=None)
@given(layouts(max_units=24, max_modules=16))
def test_the_stage_selector_keeps_the_index_convention_on_any_layout(layout):
    for options in (StageSelector.Options(), StageSelector.Options(input=False)):
        selector, k = StageSelector(options), layout.num_modules
        for module in range(1, k + 1):
            check_sources(selector_sources(selector, module, k, layout), module, k, selector)


def test_stage_selector_on_cifar_resnet32_k16(registries):
    from contsup.config.recipe import loads_recipe

    recipe = loads_recipe(CIFAR_K16.format(context="stage"), registries)
    layout = network_layout(recipe)
    assert layout.stages == ((0, 5), (6, 10), (11, 15))
    assert [m.input_shape for m in layout.modules][6:9] == [(16, 32, 32), (32, 16, 16), (32, 16, 16)]
    assert preview_sources("stage", recipe) == STAGE_CIFAR_K16
    built = build_network(recipe)
    assert {p.index: tuple(str(s) for s in p.sources) for p in built.plans} == STAGE_CIFAR_K16
    assert built.layout == layout


def test_stage_selector_without_input_and_on_other_splits():
    layout = NetworkLayout.from_split((3, 32, 32), RESNET32_UNITS, [4, 4, 4, 4])
    # module inputs: x, 16x32x32, 32x16x16, 64x8x8: every module starts its own shape
    assert [stage_sources(l, layout) for l in (1, 2, 3, 4)] == [(), (Source.input(),), (Source.input(),), (Source.input(),)]
    layout = NetworkLayout.from_split((3, 32, 32), RESNET32_UNITS, [1, 1, 1, 1, 12])
    assert stage_sources(5, layout, input=False) == (Source.feature(1),)  # modules 2..5 read 16x32x32


def test_stage_keeps_the_selector_contract():
    check_selector(StageSelector)
    check_selector(StageSelector(StageSelector.Options(input=False, shortcut="official")))
    layout = NetworkLayout.from_split((3, 32, 32), RESNET32_UNITS, [1] * 16)
    check_selector(StageSelector, layouts=[layout], max_modules=4)


def test_the_check_gives_layout_aware_selectors_a_three_stage_chain():
    layout = chain_layout(16)
    assert layout.stages == ((0, 5), (6, 10), (11, 15))
    assert [m.input_shape for m in layout.modules][:2] == [(3, 12, 12), (4, 12, 12)]

    class LastOfStage(StageSelector):  # h_{l-1}^c: one too far
        def sources(self, module, num_modules, layout):
            return (Source.feature(module - 1),) if module > 1 else ()

    with pytest.raises(AssertionError, match="module 2, K = 2..32: sources returned h1; module 2 may use x and h0"):
        check_selector(LastOfStage)


def test_which_selectors_take_the_layout():
    class Two:
        def sources(self, module, num_modules):
            return ()

    class Named:
        def sources(self, module, num_modules, *, layout):
            return (Source.input(),) if layout.module(module).stage == 2 else ()

    class Positional:
        def sources(self, module, k, net):
            return ()

    assert not takes_layout(Two()) and not takes_layout(ContSup(ContSup.Options()))
    assert takes_layout(Named()) and takes_layout(Positional()) and takes_layout(StageSelector(StageSelector.Options()))
    layout = NetworkLayout.from_split((3, 32, 32), RESNET32_UNITS, [1] * 16)
    assert selector_sources(Named(), 8, 16, layout) == (Source.input(),)
    assert selector_sources(Two(), 8, 16, None) == ()
    with pytest.raises(TypeError, match="needs the network's layout"):
        selector_sources(Named(), 8, 16, None)


def test_plan_modules_gives_the_layout_and_checks_the_answer():
    class Everything:
        name = "everything"

        def sources(self, module, num_modules, layout):
            return tuple(Source.feature(j) for j in range(layout.num_modules))

    shapes = [(4, 8, 8)] * 4
    with pytest.raises(ContsupError, match="context selector 'everything' gave module 1 the source h0"):
        plan_modules((1, 1, 1, 1), shapes, (3, 8, 8), [Everything()] * 4)


def test_memory_balanced_splits_with_a_layout_aware_selector(registries):
    from contsup.config.recipe import loads_recipe

    text = small_recipe_text(modules=4, context="stage").replace("modules = 4", 'use = "memory_balanced"\nmodules = 4')
    recipe = loads_recipe(text, registries)
    built = build_network(recipe)  # the costs are measured with the stage selector's sources, split by split
    assert sum(p.units for p in built.plans) == 10
    layout = built.layout
    assert {p.index: tuple(str(s) for s in p.sources) for p in built.plans} == {
        l: tuple(str(s) for s in stage_sources(l, layout)) for l in range(1, 5)
    }


def test_preview_sources_takes_names_classes_instances_paths_and_text(tmp_path):
    digits = ROOT / "recipes" / "digits.toml"
    stage = preview_sources("stage", digits)
    assert stage == preview_sources(StageSelector, str(digits)) == preview_sources(StageSelector(StageSelector.Options()), digits)
    assert stage[8] == ("x",) and stage[9] == ("x", "h7")  # 1x16x16 digits: the same stage boundaries
    assert preview_sources("R1E", digits)[2] == ("x", "h0")
    text = small_recipe_text(modules=4, context="none")
    assert preview_sources("R1", text) == {1: (), 2: ("h0",), 3: ("h1",), 4: ("h2",)}
    assert load_test_recipe(digits, overrides=['context.use="stage"']).context.use == "stage"


def test_plan_json_has_input_shapes_source_details_and_the_parameter_split(write_recipe, capsys):
    text = small_recipe_text(modules=4, context="stage")  # the paper text's adapters, named M_E and M_R
    path = write_recipe(text.replace('use = "stage"', 'use = "stage"\nencoder = "paper"\nshortcut = "paper"'))
    assert main(["plan", str(path), "--json"]) == 0
    modules = json.loads(capsys.readouterr().out)["modules"]
    assert [m["sources"] for m in modules] == [[], ["x"], ["x", "h1"], ["x"]]  # the old key, still strings
    assert [m["input_shape"] for m in modules] == [[3, 16, 16], [16, 16, 16], [16, 16, 16], [32, 8, 8]]
    x, h1 = modules[2]["source_details"]
    assert x["name"] == "x" and x["adapter"] == "M_E" and x["class"] == "InputEncoder" and x["source_shape"] == [3, 16, 16]
    assert h1["name"] == "h1" and h1["adapter"] == "M_R" and h1["class"] == "ShortcutAdapter" and h1["params"] == 16 * 16
    for m in modules:
        split = m["params_split"]
        assert set(split) == {"body", "head", "adapters", "decoder"}
        assert sum(split.values()) == m["params"]
        assert split["adapters"] == sum(d["params"] for d in m["source_details"])
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "module  input shape  sources (adapter, params)" in out
    assert "x (M_E, " in out and "h1 (M_R, 256)" in out


def test_plan_names_a_selectors_own_adapter_by_its_class(write_recipe, capsys):
    text = small_recipe_text(modules=3, context="contsup")
    path = write_recipe(text.replace('use = "contsup"', 'use = "contsup"\nencoder = "fast"\nshortcut = "official"\ninput = true\nrecent = 1'))
    assert main(["plan", str(path), "--json"]) == 0
    modules = json.loads(capsys.readouterr().out)["modules"]
    assert [(d["adapter"], d["class"]) for d in modules[2]["source_details"]] == [
        ("M_E fast", "FastInputEncoder"), ("M_R official", "OfficialShortcutAdapter")
    ]


def test_stage_plan_of_the_digits_recipe(capsys):
    assert main(["plan", str(ROOT / "recipes" / "digits.toml"), "--set", 'context.use="stage"']) == 0
    out = capsys.readouterr().out
    assert "context stage" in out.splitlines()[0]
    assert "input shape" in out and "M_E" in out

import pytest

import contsup_stageskip
from contsup.errors import RecipeError
from contsup.testing import check_selector, network_layout, preview_sources, validate_recipe
from contsup_stageskip import StageEntry

RECIPE = """
[data]
use = "synthetic"
shape = [3, 32, 32]

[backbone]
use = "cifar_resnet32"

[partition]
modules = 16

[context]
use = "stage_entry"
reach = "{reach}"
"""


def test_the_layout_has_three_stages():
    layout = network_layout(RECIPE.format(reach="entry"), contsup_stageskip)
    assert layout.stages == ((0, 5), (6, 10), (11, 15))
    assert layout.module(8).input_shape == (32, 16, 16) and layout.module(8).stage == 2


def test_each_module_gets_the_entry_of_its_stage():
    sources = preview_sources("stage_entry", RECIPE.format(reach="entry"), contsup_stageskip)
    assert sources[1] == ()
    assert sources[2] == ("x",)  # module 2 opens stage 1
    assert sources[7] == ("x", "h1")
    assert sources[8] == ("x",)  # module 8 opens stage 2
    assert sources[12] == ("x", "h7")
    assert sources[16] == ("x", "h12")


def test_previous_reaches_one_stage_further_back():
    selector = StageEntry(StageEntry.Options(reach="previous"))
    sources = preview_sources(selector, RECIPE.format(reach="previous"), contsup_stageskip)
    assert sources[2] == ("x", "h0") and sources[9] == ("x", "h1") and sources[14] == ("x", "h7")


def test_keeps_the_selector_contract():
    check_selector(StageEntry)
    check_selector(StageEntry(StageEntry.Options(reach="previous", input=False)))


def test_a_misspelt_choice_is_one_line():
    assert validate_recipe(RECIPE.format(reach="previous"), contsup_stageskip).context.options.reach == "previous"
    with pytest.raises(RecipeError, match="context.reach: 'previos' is not allowed; did you mean 'previous'"):
        validate_recipe(RECIPE.format(reach="previos"), contsup_stageskip)

import pytest
from hypothesis import given, settings

import contsup_flops
from contsup.errors import ContsupError, RecipeError
from contsup.testing import check_partitioner, network_layout, validate_recipe
from contsup.testing.strategies import costs
from contsup.types import Costs
from contsup_flops import FlopsBalanced, weighted_flops

RECIPE = """
[data]
use = "synthetic"
shape = [3, 32, 32]

[backbone]
use = "cifar_resnet32"

[partition]
use = "{use}"
modules = 3
{extra}
"""


def split(use, extra=""):
    """The unit counts of the recipe's three modules with partitioner ``use``."""
    layout = network_layout(RECIPE.format(use=use, extra=extra), contsup_flops)
    return [m.units for m in layout.modules]


def test_keeps_the_partitioner_contract():
    check_partitioner(FlopsBalanced)
    check_partitioner(FlopsBalanced(FlopsBalanced.Options(stage_weights=(2.0, 1.0, 1.0))))


@settings(max_examples=50, deadline=None)
@given(costs(flops=True, measured=False))
def test_keeps_it_on_any_table(table):
    check_partitioner(FlopsBalanced, costs=[table], generated=False)


def test_resnet32_in_three_modules():
    assert split("uniform") == [5, 5, 6]
    assert split("flops_balanced") == [6, 5, 5]  # the stem is light: module 1 takes it and five blocks
    assert split("memory_balanced") == [4, 3, 9]  # activations shrink stage by stage; FLOPs do not
    assert split("flops_balanced", "stage_weights = [2.0, 1.0, 1.0]") == [4, 5, 7]


def test_stage_weights_multiply_each_stage():
    table = Costs((1.0, 1.0, 1.0), measured=False, flops=(1.0, 2.0, 3.0), input_shape=(3, 8, 8), unit_shapes=[(8, 4, 4)] * 2 + [(16, 2, 2)])
    assert table.stages == ((0, 1), (2, 2))
    assert weighted_flops(table) == (1.0, 2.0, 3.0)
    assert weighted_flops(table, (2.0, 0.5)) == (2.0, 4.0, 1.5)
    with pytest.raises(ContsupError, match="partition.stage_weights: 3 weights for a backbone of 2 stages; give one per stage"):
        weighted_flops(table, (1.0, 1.0, 1.0))


def test_the_list_option_is_checked():
    text = RECIPE.format(use="flops_balanced", extra="stage_weights = {}")
    assert validate_recipe(text.format("[2, 1.5, 1]"), contsup_flops).partitioner.options.stage_weights == (2.0, 1.5, 1.0)
    with pytest.raises(RecipeError, match=r"partition.stage_weights: every weight must be > 0, got \[1.0, 0.0\]"):
        validate_recipe(text.format("[1.0, 0.0]"), contsup_flops)
    with pytest.raises(RecipeError, match=r'partition.stage_weights: item 1: expected a number, got a string \("fast"\)'):
        validate_recipe(text.format('[1.0, "fast"]'), contsup_flops)
    with pytest.raises(ContsupError, match="partition.stage_weights: 2 weights for a backbone of 3 stages"):
        split("flops_balanced", "stage_weights = [2.0, 1.0]")

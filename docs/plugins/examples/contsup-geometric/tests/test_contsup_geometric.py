import pytest
import torch

import contsup_geometric
from contsup.errors import RecipeError
from contsup.testing import check_selector, registries, validate_recipe
from contsup_geometric import GatedShortcut, Geometric


def sources(module, **options):
    selector = Geometric(Geometric.Options(**options))
    return [str(s) for s in selector.sources(module, 16)]


def test_sources_are_the_input_and_features_1_2_4_back():
    assert sources(1) == []
    assert sources(2) == ["x", "h0"]
    assert sources(10) == ["x", "h1", "h5", "h7", "h8"]  # distances 8, 4, 2, 1
    assert sources(10, base=3, input=False) == ["h0", "h6", "h8"]  # distances 9, 3, 1
    assert sources(10, limit=2) == ["x", "h7", "h8"]


def test_keeps_the_selector_contract():
    check_selector(Geometric)
    check_selector(Geometric(Geometric.Options(base=3, input=False, limit=2, gate=0.5)))


def test_a_closed_gate_adds_nothing_yet_learns():
    adapter = GatedShortcut((16, 32, 32), (32, 16, 16), gate=0.0)
    out = adapter(torch.randn(2, 16, 32, 32))
    assert out.shape == (2, 32, 16, 16) and out.abs().max() == 0
    out.sum().backward()
    assert adapter.gate.grad is not None


def test_the_plugin_registers_the_selector():
    assert "geometric" in registries(contsup_geometric).context_selectors


RECIPE = """
[data]
use = "synthetic"
shape = [3, 16, 16]

[backbone]
use = "cifar_resnet20"

[partition]
modules = 4

[context]
use = "geometric"
base = {base}
"""


def test_recipes_can_use_it():
    recipe = validate_recipe(RECIPE.format(base=3), contsup_geometric)
    assert recipe.context.options == Geometric.Options(base=3)
    with pytest.raises(RecipeError, match="context.base: must be >= 2"):
        validate_recipe(RECIPE.format(base=1), contsup_geometric)

"""AugLocal heads ([objective] head = "auglocal"): module l's auxiliary head is fresh copies of
uniformly sampled later backbone units, then pool + linear; the depth falls toward module K-1."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from contsup.cli import main
from contsup.tools.plan import plan_data
from contsup.config.recipe import RecipeError, loads_recipe
from contsup.errors import ContsupError
from contsup.model.network import build_network
from contsup.types import HeadSpec
from contsup_objectives.auglocal import AugLocalHead, auglocal_depth, copied_units, sample_units
from contsup_objectives.heads import Normalized

from tiny import one_thread, tiny_recipe_text, validate_plan_and_train_a_digits_epoch  # noqa: F401  (one_thread: autouse fixture)

AUGLOCAL = '\n[objective]\nuse = "{objective}"\nhead = "auglocal"\ndepth = {depth}\npyramid = {pyramid}\n'


def _recipe(registries, tmp_path, depth=3, pyramid=1.0, objective="cross_entropy", modules=4, extra="", **kwargs):
    text = tiny_recipe_text(
        tmp_path, modules=modules, extra=AUGLOCAL.format(objective=objective, depth=depth, pyramid=pyramid) + extra, **kwargs
    )
    return loads_recipe(text, registries, source="tiny.toml")


def _aug(head: nn.Module) -> AugLocalHead:
    return head.head if isinstance(head, Normalized) else head


def test_depth_falls_linearly_to_one_at_the_last_local_module():
    # ResNet-32 at K = 16 with d = 2 (the AugLocal code's CIFAR setting): 2 down to 1
    depths = [auglocal_depth(2, 1.0, l, 16) for l in range(1, 16)]
    assert depths[0] == 2 and depths[-1] == 1 and depths == sorted(depths, reverse=True)
    assert [auglocal_depth(5, 1.0, l, 6) for l in range(1, 6)] == [5, 4, 3, 2, 1]
    assert [auglocal_depth(4, 0.0, l, 6) for l in range(1, 6)] == [4] * 5  # pyramid 0: no taper
    # pyramid 0.5: halfway, from 5 to 3 (round(5 - 4 * 0.5 * (l-1)/4))
    assert [auglocal_depth(5, 0.5, l, 6) for l in range(1, 6)] == [5, 4, 4, 4, 3]
    assert auglocal_depth(3, 1.0, 1, 2) == 3  # one local module keeps d


def test_sampling_is_uniform_over_the_later_units_and_ends_at_the_last():
    assert sample_units(1, 10, 3) == [4, 6, 9]  # 8 later units: 1 + 8i/3 rounded
    assert sample_units(0, 16, 2) == [8, 15]
    assert sample_units(6, 10, 1) == [9]
    assert sample_units(6, 10, 5) == [7, 8, 9]  # fewer later units than the depth: all of them
    with pytest.raises(ValueError):
        sample_units(9, 10, 1)


@pytest.mark.parametrize("objective", ["cross_entropy", "supcon"])
def test_heads_are_fresh_copies_of_the_sampled_units(registries, tmp_path, objective):
    recipe = _recipe(registries, tmp_path, depth=3, objective=objective)
    torch.manual_seed(0)
    built = build_network(recipe)
    net = built.network
    k = len(net.blocks)
    backbone = [u for m in net.blocks for u in m.body]
    body_ptrs = {p.data_ptr() for m in net.blocks for p in m.body.parameters()}
    for m, plan in zip(list(net.blocks)[:-1], built.plans):
        head = _aug(m.head)
        assert head.depth == auglocal_depth(3, 1.0, plan.index, k)
        assert list(head.sampled) == sample_units(plan.unit_range[1], len(backbone), head.depth)
        copies = copied_units(head)
        assert len(copies) == len(head.sampled)
        h = torch.randn(2, *plan.output_shape)
        for u, twin in zip(head.sampled, copies):
            original = backbone[u]
            assert type(twin) is type(original)
            assert [p.shape for p in twin.parameters()] == [p.shape for p in original.parameters()]
            assert not {p.data_ptr() for p in twin.parameters()} & body_ptrs  # own weights
            assert any(not torch.equal(a, b) for a, b in zip(twin.parameters(), original.parameters())
                       if a.dim() > 1)  # reinitialised, not the unit's starting weights
        out = m.head(h)
        assert out.shape == (2, 128 if objective == "supcon" else 10)
    # every parameter of the network is its own
    ptrs = [p.data_ptr() for p in net.parameters()]
    assert len(ptrs) == len(set(ptrs))


def test_a_head_that_skips_a_change_of_shape_bridges_it():
    units = [nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 8, 3, stride=2, padding=1),
             nn.Conv2d(8, 8, 3, padding=1)]
    shapes = [(4, 8, 8), (4, 8, 8), (8, 4, 4), (8, 4, 4)]
    spec = HeadSpec((4, 8, 8), (8, 4, 4), 5, module=1, num_modules=2, last_unit=0, units=units, unit_shapes=shapes)
    head = AugLocalHead(spec, out=5, depth=1, pyramid=1.0)  # samples unit 3, which takes 8x4x4
    assert head.sampled == (3,)
    assert len(head.features) == 2  # M_R from 4x8x8 to 8x4x4, then the copy
    assert head(torch.randn(2, 4, 8, 8)).shape == (2, 5)


def test_without_the_network_it_says_what_is_missing():
    with pytest.raises(ContsupError, match="auglocal"):
        AugLocalHead(HeadSpec((4, 8, 8), (8, 4, 4), 5), out=5, depth=2, pyramid=1.0)


def test_recipe_options_validate(registries, tmp_path):
    recipe = _recipe(registries, tmp_path, depth=2, pyramid=0.5)
    assert (recipe.objective.options.head, recipe.objective.options.depth, recipe.objective.options.pyramid) == (
        "auglocal", 2, 0.5)
    for depth, pyramid, key in ((0, 1.0, "objective.depth"), (2, 1.5, "objective.pyramid")):
        with pytest.raises(RecipeError) as exc:
            _recipe(registries, tmp_path, depth=depth, pyramid=pyramid)
        assert any(key in p for p in exc.value.problems), exc.value.problems


def test_plan_shows_each_head_its_units_params_and_memory(registries, tmp_path, capsys):
    recipe = _recipe(registries, tmp_path, depth=3)
    data = plan_data(recipe)
    torch.manual_seed(recipe.run.seed)
    built = build_network(recipe)
    local = data["modules"][:-1]
    assert data["modules"][-1]["auglocal"] is None
    for m, block in zip(local, built.network.blocks):
        a = m["auglocal"]
        assert a["depth"] == block.head.depth and a["units"] == list(block.head.sampled)
        assert a["unit_shapes"] == [list(built.unit_shapes[u]) for u in a["units"]]
        assert a["params"] == m["params_split"]["head"] == sum(p.numel() for p in block.head.parameters())
        assert m["memory"]["head_bytes"] > 0
    plain = plan_data(loads_recipe(tiny_recipe_text(tmp_path, modules=4), registries, source="tiny.toml"))
    assert all(m["auglocal"] is None for m in plain["modules"])
    path = tmp_path / "auglocal.toml"
    path.write_text(tiny_recipe_text(tmp_path, modules=4, extra=AUGLOCAL.format(objective="cross_entropy", depth=3, pyramid=1.0)))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "auglocal heads" in out and "head memory (MiB)" in out
    assert main(["plan", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["modules"][0]["auglocal"]["depth"] == 3


def test_validates_plans_and_trains_a_tiny_digits_epoch(tmp_path, capsys):
    tables = '\n[objective]\nuse = "cross_entropy"\nhead = "auglocal"\ndepth = 2\n'
    validate_plan_and_train_a_digits_epoch(tmp_path, tables, "digits_auglocal.toml", "auglocal heads", capsys)

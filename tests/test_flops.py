"""Counting a unit's forward FLOPs for a partitioner (contsup.model.flops): torch's count of one
image, the same on fake and real units, and nothing about the units changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from contsup.config.recipe import loads_recipe
from contsup.errors import ContsupError
from contsup.model.build import recipe_parts
from contsup.model.flops import unit_flops
from contsup.tools.plan import forward_flops

from conftest import small_recipe_text


def test_a_convolution_counts_two_per_multiply_add_and_batch_norm_nothing():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    linear = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    assert unit_flops([conv, linear], (3, 4, 4)) == (2.0 * 8 * 3 * 9 * 4 * 4, 2.0 * 8 * 4 * 4 * 10)


def test_units_of_a_recipe_fake_or_real_count_what_plan_counts_and_stay_as_they_were(registries):
    recipe = loads_recipe(small_recipe_text(modules=2), registries, source="small.toml")
    parts, shapes, info = recipe_parts(recipe)
    units = list(parts.units)
    units[1].train()
    list(units[1].modules())[1].eval()  # a submodule in another mode than its unit: restored as it was
    modes = [m.training for u in units for m in u.modules()]
    state = [{k: v.clone() for k, v in u.state_dict().items()} for u in units]
    torch.manual_seed(7)
    expected_random = torch.rand(2)
    torch.manual_seed(7)
    counted = unit_flops(units, info.input_shape)
    assert torch.equal(torch.rand(2), expected_random)
    assert [m.training for u in units for m in u.modules()] == modes
    assert all(all(torch.equal(s[k], v) for k, v in u.state_dict().items()) for s, u in zip(state, units))
    in_shapes = [info.input_shape, *shapes[:-1]]
    assert counted == tuple(float(forward_flops(u, s)) for u, s in zip(units, in_shapes))
    assert min(counted) > 0 and len(counted) == len(shapes)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    fake_parts, _, _ = recipe_parts(recipe, fake)
    assert unit_flops(list(fake_parts.units), info.input_shape, fake) == counted


def test_a_unit_that_cannot_run_is_named():
    class Broken(nn.Module):
        def forward(self, h):
            raise RuntimeError("needs\na tensor of another shape")

    with pytest.raises(ContsupError, match=r"partition: counting the forward FLOPs of unit 1 failed \(RuntimeError: needs\\na tensor") as err:
        unit_flops([nn.Identity(), Broken()], (3, 4, 4))
    assert "\n" not in str(err.value)

import pytest
import torch

import contsup_momentum
from contsup.errors import RecipeError
from contsup.testing import check_method, greedy_steps, validate_recipe
from contsup_momentum import MomentumAux, next_unit

RECIPE = """
[data]
use = "synthetic"
shape = [3, 16, 16]

[backbone]
use = "cifar_resnet20"

[partition]
modules = 4

[context]
use = "R1E"

[momentum_aux]
momentum = {momentum}
learnable = {learnable}
"""


def steps(momentum=0.9, learnable="true"):
    return greedy_steps(RECIPE.format(momentum=momentum, learnable=learnable), contsup_momentum)


def values(module):
    return [p.detach().clone() for p in module.parameters()]


def test_the_copy_follows_the_live_unit_to_the_bit():
    """After every step ema = m * ema + (1 - m) * live, with the live unit as it was before
    module l+1 stepped on that batch."""
    s = steps(momentum=0.9)
    network = s.network
    local = list(network.blocks)[:-1]  # modules 1..K-1 have the copies
    for _ in range(3):
        ema = [values(m.part.ema) for m in local]
        live = [values(next_unit(network, m)) for m in local]
        s.step()
        for m, ema_before, live_before in zip(local, ema, live):
            for e, a, b in zip(m.part.ema.parameters(), ema_before, live_before):
                assert torch.equal(e, a * 0.9 + b * (1 - 0.9))


def test_the_copies_start_as_the_live_unit_and_only_the_trainable_one_learns():
    s = steps()
    first = s.network.blocks[0]
    assert all(torch.equal(e, p) for e, p in zip(first.part.ema.parameters(), next_unit(s.network, first).parameters()))
    lb = values(first.part.lb)
    s.step()
    assert all(e.grad is None for e in first.part.ema.parameters())
    assert any(not torch.equal(p, p0) for p, p0 in zip(first.part.lb.parameters(), lb))
    assert s.network.blocks[-1].part is None  # module K keeps the backbone's head


def test_without_the_trainable_copy():
    s = steps(learnable="false")
    assert all(m.part.lb is None for m in list(s.network.blocks)[:-1])
    s.step()


def test_recipes_can_use_it():
    recipe = validate_recipe(RECIPE.format(momentum=0.99, learnable="true"), contsup_momentum)
    assert recipe.method.options == MomentumAux.Options(momentum=0.99)
    with pytest.raises(RecipeError, match="momentum_aux.momentum: must be in"):
        validate_recipe(RECIPE.format(momentum=1.5, learnable="true"), contsup_momentum)


def test_the_method_keeps_the_contract():
    """What every method owes the greedy step, checked by contsup on small networks."""
    check_method(MomentumAux, contsup_momentum)

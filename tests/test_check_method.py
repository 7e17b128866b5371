"""contsup.testing.check_method: the built-in training methods pass it, and each way a method can
break the greedy step's contract is reported in one line naming the module and K."""

from __future__ import annotations

import random

import attrs
import pytest
import torch
from torch import nn

from contsup.testing import check_method
from contsup_methods import HPFF, MAN, BackLink

from conftest import small_recipe_text


@pytest.mark.parametrize("method", [BackLink, BackLink(BackLink.Options(units=2)), MAN, HPFF], ids=["backlink-off", "backlink-2", "man", "hpff"])
def test_the_builtin_methods_keep_the_contract(method):
    check_method(method)


class Plain:
    """A method that changes nothing: the correct start of the broken ones below."""

    name = "plain"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options=None):
        self.options = options

    def active(self):
        return True


def failure(method, **kwargs) -> str:
    with pytest.raises(AssertionError) as err:
        check_method(method, **kwargs)
    return str(err.value)


def test_a_method_that_changes_nothing_passes_and_the_random_state_is_left_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    check_method(Plain, modules=(3,))
    assert torch.equal(torch.rand(3), expected)


class LinksTheLast(Plain):
    def link(self, module, num_modules, units):
        return 1


class LinksTooFar(Plain):
    def link(self, module, num_modules, units):
        return units + 1 if module < num_modules else 0


def test_links_must_be_in_range_and_0_for_the_last_module():
    text = failure(LinksTheLast, modules=(3,))
    assert "module 3, K = 3: link(K, K, units) returned 1; expected 0" in text
    assert "link(l, K" in failure(LinksTooFar, modules=(3,)) and "expected an integer in 0.." in failure(LinksTooFar, modules=(3,))


class InactiveButLinked(Plain):
    def active(self):
        return False

    def link(self, module, num_modules, units):
        return 1 if module < num_modules else 0


def test_an_inactive_method_must_train_as_plain_greedy():
    assert "active() is False, yet the greedy step serving its hooks trains differently" in failure(InactiveButLinked, modules=(2,))


class _Reads(nn.Module):
    """module l's head reads h_l + u(h_l), u the live first unit of module l+1 (shared, not copied)."""

    def __init__(self, unit, shape):
        super().__init__()
        self.unit = unit
        self.feature_shape = shape

    def feature(self, h):
        return self.unit(h)


class SharesTheNextUnit(Plain):
    def part(self, spec, objective):
        if spec.module >= spec.num_modules:
            return None
        u = spec.last_unit + 1
        return _Reads(spec.units[u], spec.unit_shapes[u])


class _ReadsHidden(_Reads):
    """The same, the unit kept out of the part's parameters (in a tuple)."""

    def __init__(self, unit, shape):
        super().__init__(nn.Identity(), shape)
        self.hidden = (unit,)

    def feature(self, h):
        return self.hidden[0](h)


class ReadsTheNextUnit(Plain):
    def part(self, spec, objective):
        if spec.module >= spec.num_modules:
            return None
        u = spec.last_unit + 1
        return _ReadsHidden(spec.units[u], spec.unit_shapes[u])


def test_a_part_sharing_another_modules_unit_is_reported():
    text = failure(SharesTheNextUnit, modules=(3,))
    assert "module 1, K = 3: its part holds parameters of module 2; copy what it reads" in text
    assert "module 2, K = 3: its part holds parameters of module 3" in text


def test_a_loss_reaching_another_module_is_reported():
    text = failure(ReadsTheNextUnit, modules=(3,))
    assert "module 1, K = 3: the module's loss gives gradient to module(s) 2 outside its reach (it links nothing" in text
    assert "holds parameters" not in text


class MovesTheNextModule(Plain):
    def after_step(self, module, network):
        if module.index < network.num_modules:
            with torch.no_grad():
                next(network.blocks[module.index].parameters()).mul_(0.5)


def test_after_step_may_change_its_own_module_only():
    assert "module 1, K = 2: after_step changed blocks.1." in failure(MovesTheNextModule, modules=(2,))


class Unseeded(Plain):
    def terms(self, module, num_modules, total, extra):
        return total * random.uniform(0.5, 1.5), None


class NotFinite(Plain):
    def terms(self, module, num_modules, total, extra):
        return total * float("nan"), None


def test_determinism_and_finite_losses():
    assert "two runs from the same seed end with different weights" in failure(Unseeded, modules=(2,))
    text = failure(NotFinite, modules=(2,))
    assert "module 1, K = 2: terms returned a term that is not None or a finite scalar tensor" in text
    assert "different weights" not in text  # NaN equals NaN there: one cause, one line


def test_a_recipe_of_the_authors_own(tmp_path):
    check_method(MAN, recipe=small_recipe_text(out_dir=str(tmp_path), modules=3, context="none"))
    # a recipe with a method table of its own: the checked method replaces it
    check_method(HPFF, recipe=small_recipe_text(out_dir=str(tmp_path), modules=3, extra="\n[man]\n"))


def test_a_method_without_active_is_reported():
    class NoActive:
        name = "none"
        options = None

    assert "it has no active() method" in failure(NoActive())

"""contsup.testing.greedy_steps: a recipe's network and its greedy step, one step at a time,
training method hooks included, for a method's own tests."""

from __future__ import annotations

import attrs
import pytest
import torch

from contsup import hookimpl
from contsup.testing import greedy_steps

from conftest import small_recipe_text


class _Counting:
    """A method that records when its hooks run."""

    name = "counting"
    calls: list = []

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options):
        self.options = options

    def active(self):
        return True

    def prepare(self, network):
        _Counting.calls.append(("prepare", network.num_modules))

    def after_step(self, module, network):
        _Counting.calls.append(("after_step", module.index))


class _CountingPlugin:
    @hookimpl
    def register_methods(self, register):
        register(_Counting)


def test_greedy_steps_take_the_greedy_step_with_the_method():
    text = small_recipe_text(modules=3) + "\n[counting]\n"
    _Counting.calls = []
    steps = greedy_steps(text, _CountingPlugin())
    assert steps.method.name == _Counting.name and steps.network.training  # seen through its contract (core.guard)
    assert _Counting.calls == [("prepare", 3)]
    before = [[q.detach().clone() for q in m.parameters()] for m in steps.network.blocks]
    losses = steps.step()
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    assert _Counting.calls[1:] == [("after_step", 1), ("after_step", 2), ("after_step", 3)]
    for m, old in zip(steps.network.blocks, before):
        assert any(not torch.equal(q, q0) for q, q0 in zip(m.parameters(), old)), f"module {m.index} did not step"
    again = greedy_steps(text, _CountingPlugin())
    again.step()  # the same network, the same first batch: the same step
    assert all(torch.equal(a, b) for a, b in zip(again.network.state_dict().values(), steps.network.state_dict().values()))


def test_greedy_steps_need_greedy_training():
    assert greedy_steps(small_recipe_text(modules=2)).method is None
    with pytest.raises(ValueError, match='run.mode = "greedy"'):
        greedy_steps(small_recipe_text(modules=2, mode="e2e"))

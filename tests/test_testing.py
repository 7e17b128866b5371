"""contsup.testing: the plugin manager for plugin authors' tests, and the selector checker, which
passes the built-in selectors and names the module and K of every rule a broken one breaks."""

from __future__ import annotations

import importlib.metadata
import types

import attrs
import pluggy
import pytest
import torch
from torch import nn

from contsup import hookimpl
from contsup.core.plugins import BUILTIN_PLUGINS
from contsup.testing import check_adapter, check_selector, greedy_steps, plugin_manager, registries, validate_recipe
from contsup.types import Source
from contsup_context import ContSup
from contsup_context.adapters import ShortcutAdapter

from conftest import small_recipe_text


class Recent:
    """R1 with the paper's adapters: a correct selector the broken ones below start from."""

    name = "recent"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options):
        self.options = options

    def sources(self, module, num_modules):
        return (Source.feature(module - 2),) if module >= 2 else ()


def failure(selector, max_modules=6) -> str:
    with pytest.raises(AssertionError) as err:
        check_selector(selector, max_modules=max_modules)
    return str(err.value)


@pytest.mark.parametrize("name", ["none", "R1E", "M2R1E"])
def test_builtin_selectors_keep_the_contract(name):
    check_selector(ContSup(ContSup.Options(**ContSup.resolve_name(name))))


def test_dense_and_official_variants_keep_the_contract():
    check_selector(ContSup(ContSup.Options(input=True, dense=True, encoder="official", shortcut="official")), max_modules=12)


def test_a_class_is_checked_with_its_default_options():
    check_selector(Recent, max_modules=8)


def test_sources_out_of_range_name_module_and_k():
    class TooRecent(Recent):
        def sources(self, module, num_modules):
            return (Source.feature(module - 1),) if module >= 2 else ()

    text = failure(TooRecent)
    assert text.startswith("context selector 'recent' (test_sources_out_of_range_name_module_and_k.<locals>.TooRecent) breaks")
    assert "module 2, K = 2..6: sources returned h1; module 2 may use x and h0" in text
    assert "module 4, K = 4..6: sources returned h3; module 4 may use x and h0..h2" in text


def test_module_one_gets_no_context():
    class InputEverywhere(Recent):
        def sources(self, module, num_modules):
            return (Source.input(),)

    assert "module 1, K = 1..6: sources returned x; module 1 gets no context" in failure(InputEverywhere)


def test_no_source_twice_and_only_sources():
    class Twice(Recent):
        def sources(self, module, num_modules):
            return (Source.feature(0), Source.feature(0)) if module >= 2 else ()

    class NotASource(Recent):
        def sources(self, module, num_modules):
            return (0,) if module >= 2 else ()

    assert "module 2, K = 2..6: sources returned h0 twice; each source at most once" in failure(Twice)
    assert "module 2, K = 2..6: sources returned 0 (int); expected a contsup.types.Source" in failure(NotASource)


def test_sources_must_not_change_between_calls_or_raise():
    class Fickle(Recent):
        calls = 0

        def sources(self, module, num_modules):
            Fickle.calls += 1
            return (Source.feature(0),) if module >= 2 and Fickle.calls % 2 else ()

    class Raising(Recent):
        def sources(self, module, num_modules):
            if module == 3 and num_modules == 5:
                raise KeyError("no plan")
            return super().sources(module, num_modules)

    assert "it must give the same every time" in failure(Fickle)
    assert "module 3, K = 5: sources(3, K) raised KeyError: 'no plan'" in failure(Raising)


def test_adapters_must_give_h_shape():
    class NoPool(Recent):
        def adapter(self, source, source_shape, target_shape):
            return nn.Conv2d(source_shape[0], target_shape[0], 1)

    text = failure(NoPool)
    assert "adapter for h0 from 3x32x32 to 32x16x16 (train mode): returned shape (2, 32, 32, 32); expected (2, 32, 16, 16) (h's shape)" in text
    assert len(text.splitlines()) == 2  # the first failing shape says enough


def test_adapters_must_not_change_their_input():
    class InPlace(Recent):
        def adapter(self, source, source_shape, target_shape):
            return nn.Sequential(nn.ReLU(inplace=True), ShortcutAdapter(source_shape, target_shape))

    assert "changed its input in place" in failure(InPlace)


def test_adapters_must_not_keep_their_input():
    class Remembering(nn.Module):
        def __init__(self, source_shape, target_shape):
            super().__init__()
            self.inner = ShortcutAdapter(source_shape, target_shape)

        def forward(self, c):
            self.last = c
            return self.inner(c)

    class Keeps(Recent):
        def adapter(self, source, source_shape, target_shape):
            return Remembering(source_shape, target_shape)

    assert "keeps a reference to its input" in failure(Keeps)


def test_shared_adapters_break_gradient_isolation():
    class Shared(Recent):
        def __init__(self, options):
            super().__init__(options)
            self.cache = {}

        def sources(self, module, num_modules):
            return (Source.feature(0),) if module >= 2 else ()

        def adapter(self, source, source_shape, target_shape):
            key = (source_shape, target_shape)
            return self.cache.setdefault(key, ShortcutAdapter(source_shape, target_shape))

    text = failure(Shared)
    assert "module 3, K = 4: the module's loss reaches the adapter for h0 of module 2; build a new adapter" in text


def test_adapter_weights_must_be_parameters_that_train():
    class Loose(nn.Module):
        def __init__(self, source_shape, target_shape):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(target_shape[1:])
            self.weight = torch.randn(target_shape[0], source_shape[0], 1, 1, requires_grad=True)

        def forward(self, c):
            return nn.functional.conv2d(self.pool(c), self.weight)

    class Detached(nn.Module):
        def __init__(self, source_shape, target_shape):
            super().__init__()
            self.inner = ShortcutAdapter(source_shape, target_shape)

        def forward(self, c):
            return self.inner(c).detach()

    class UsesLoose(Recent):
        def adapter(self, source, source_shape, target_shape):
            return Loose(source_shape, target_shape)

    class UsesDetached(Recent):
        def adapter(self, source, source_shape, target_shape):
            return Detached(source_shape, target_shape)

    assert "module 2, K = 2: the module's loss reaches a tensor of shape (4, 3, 1, 1) that is no parameter" in failure(UsesLoose)
    assert "module 2, K = 2: the adapter for h0 gets no gradient from the module's loss, so it never trains" in failure(UsesDetached)


def test_a_class_without_options_is_reported():
    class Bare:
        name = "bare"

    with pytest.raises(AssertionError, match="Bare has no attrs 'Options' class"):
        check_selector(Bare)


def test_long_reports_are_cut():
    class Everything(Recent):
        def sources(self, module, num_modules):
            return tuple(Source.feature(j) for j in range(module + 1))

    lines = failure(Everything, max_modules=32).splitlines()
    assert len(lines) == 1 + 20 + 1 and lines[-1].startswith("... and ")


def test_check_adapter_alone():
    class NoPool(Recent):
        def adapter(self, source, source_shape, target_shape):
            return nn.Conv2d(source_shape[0], target_shape[0], 1)

    check_adapter(Recent, Source.feature(2), (16, 32, 32), (32, 16, 16))  # the paper's M_R
    with pytest.raises(AssertionError, match=r"adapter for h2 from 16x32x32 to 32x16x16 \(train mode\): returned shape"):
        check_adapter(NoPool, Source.feature(2), (16, 32, 32), (32, 16, 16))


def test_the_checker_leaves_the_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_selector(Recent, max_modules=3)
    assert torch.equal(torch.rand(3), expected)


# -- plugin managers ------------------------------------------------------------------------------


def plugin(selector_name="ring", fail=False):
    module = types.ModuleType("my_ring")

    class Ring(Recent):
        name = selector_name

    @hookimpl
    def register_context_selectors(register):
        if fail:
            raise RuntimeError("broken on purpose")
        register(Ring)

    module.register_context_selectors = register_context_selectors
    return module


def test_plugin_manager_has_the_builtins_and_the_plugin_only(monkeypatch):
    class Installed:
        name, value, group, dist = "other", "other_module", "contsup", None

        def load(self):
            raise AssertionError("contsup.testing must not load installed plugins")

    real = importlib.metadata.entry_points

    def entry_points(group=None, **kwargs):
        return [Installed()] if group == "contsup" else real(**({"group": group} if group else {}), **kwargs)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    pm = plugin_manager(plugin())
    assert set(pm.info) == set(BUILTIN_PLUGINS) | {"my_ring"}
    assert pm.info["my_ring"].distribution == "(not installed)" and not pm.info["my_ring"].builtin
    assert registries(plugin()).context_selectors.entry("ring").plugin == "my_ring"


def test_plugin_errors_are_raised_in_tests():
    with pytest.raises(RuntimeError, match="broken on purpose"):
        registries(plugin(fail=True))
    misspelt = types.ModuleType("misspelt")

    @hookimpl
    def register_selectors(register):
        pass

    misspelt.register_selectors = register_selectors
    with pytest.raises(pluggy.PluginValidationError, match="unknown hook 'register_selectors'"):
        plugin_manager(misspelt)


def test_validate_recipe_with_a_plugin():
    recipe = validate_recipe(small_recipe_text(context="ring", modules=3), plugin())
    assert recipe.context.use == "ring" and recipe.context.plugin == "my_ring"


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
    assert isinstance(steps.method, _Counting) and steps.network.training
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

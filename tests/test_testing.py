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
from contsup.testing import check_adapter, check_selector, plugin_manager, registries, validate_recipe
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


# -- check_partitioner ----------------------------------------------------------------------------

from contsup.errors import ContsupError  # noqa: E402
from contsup.partition import even_split, min_max_split  # noqa: E402
from contsup.testing import check_decoder, check_objective, check_partitioner  # noqa: E402
from contsup.types import Costs, HeadSpec  # noqa: E402


class Even:
    """The uniform split: a correct partitioner the broken ones below start from."""

    name = "even"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options):
        self.options = options

    def split(self, costs, k):
        return even_split(costs.n, k)


def partitioner_failure(partitioner, **kwargs) -> str:
    with pytest.raises(AssertionError) as err:
        check_partitioner(partitioner, **kwargs)
    return str(err.value)


def test_a_correct_partitioner_passes_and_the_checker_leaves_the_random_state_alone():
    import random

    random.seed(5)
    expected = random.random()
    random.seed(5)
    check_partitioner(Even)
    assert random.random() == expected


def test_parts_that_do_not_cover_the_units_name_k_and_the_costs():
    class Short(Even):
        def split(self, costs, k):
            sizes = list(even_split(costs.n, k))
            if k == 2:
                sizes[-1] -= 1
            return sizes

    class Wrong(Even):
        def split(self, costs, k):
            return (costs.n,) if k == 3 else even_split(costs.n, k)

    class Floats(Even):
        def split(self, costs, k):
            return tuple(float(s) for s in even_split(costs.n, k))

    class Empty(Even):
        def split(self, costs, k):
            return (0, costs.n) if k == 2 else even_split(costs.n, k)

    text = partitioner_failure(Short)
    assert text.startswith("partitioner 'even' (test_parts_that_do_not_cover_the_units_name_k_and_the_costs.<locals>.Short) breaks the partitioner contract:")
    assert "\nK = 2 of units = [1, 1] (n = 2, not measured): returned (1, 0), an empty or negative part" in text
    only = Costs((4.0, 1.0, 2.0))  # the author's own table comes first
    text = partitioner_failure(Wrong, costs=[only], max_units=4)
    assert "K = 3 of units = [4, 1, 2] (n = 3): returned (3,), 1 parts; expected K = 3 (and " in text
    assert "holds something other than integers" in partitioner_failure(Floats, max_units=3)
    assert "K = 2 of units = [1, 1] (n = 2, not measured): returned (0, 2), an empty or negative part" in partitioner_failure(Empty, max_units=3)
    short = partitioner_failure(Short, costs=[Costs((5.0, 6.0, 7.0))], max_units=1)
    assert "K = 2 of units = [5, 6, 7] (n = 3): returned (1, 1), which covers 2 units; the K parts must cover all 3, each once" in short


def test_a_split_must_not_change_between_calls_or_carry_state():
    class Flaky(Even):
        calls = 0

        def split(self, costs, k):
            Flaky.calls += 1
            sizes = list(even_split(costs.n, k))
            if k == 2 and Flaky.calls % 2:
                sizes = sizes[::-1]
            return sizes

    class Remembers(Even):
        def __init__(self, options):
            super().__init__(options)
            self.last_k = 0

        def split(self, costs, k):  # reversed after a larger K: the answer depends on what came before
            sizes = even_split(costs.n, k)
            after_larger, self.last_k = self.last_k > k, k
            return sizes[::-1] if after_larger else sizes

    assert "then (" in partitioner_failure(Flaky, max_units=5) and "for an equal table; it must give the same every time" in partitioner_failure(Flaky, max_units=5)
    assert "after splitting other tables; keep no state between calls" in partitioner_failure(Remembers, max_units=5)


def test_a_balancer_is_never_worse_than_uniform_on_what_it_says_it_balances():
    class ClaimsMemory(Even):
        needs_costs = True

        def split(self, costs, k):  # balances the units' reversed order: not what it claims
            return min_max_split(Costs(tuple(reversed(costs.units))), k)

        def balances(self, costs):
            return costs

    text = partitioner_failure(ClaimsMemory, costs=[Costs((9.0, 1.0, 1.0))])
    assert "K = 2 of units = [9, 1, 1] (n = 3): its split (2, 1) has a largest module of 10 of the costs it balances, the uniform split (1, 2) only 9" in text
    assert not hasattr(Even, "balances")  # no claim, no such check: uniform's answer is its own


def test_errors_are_problems_refusals_pass_unless_every_case_is_refused():
    class Raises(Even):
        def split(self, costs, k):
            if k == 2:
                raise KeyError("no plan")
            return even_split(costs.n, k)

    class RefusesAll(Even):
        def split(self, costs, k):
            raise ContsupError("partition: never")

    class Multiline(Even):
        def split(self, costs, k):
            if k == 2:
                raise ContsupError("partition: two\nlines")
            return even_split(costs.n, k)

    assert "K = 2 of units = [1, 1] (n = 2, not measured): split raised KeyError: 'no plan'; refuse a case with a one-line contsup.errors.ContsupError" in partitioner_failure(Raises, max_units=3)
    assert "refused every case, the first with: ContsupError: partition: never" in partitioner_failure(RefusesAll, max_units=3)
    assert "refused with a message of several lines" in partitioner_failure(Multiline, max_units=3)


def test_a_flops_partitioner_that_forgets_to_ask_is_told_so():
    class Flops(Even):
        def split(self, costs, k):
            return min_max_split(Costs(costs.flops), k)

        def balances(self, costs):
            return Costs(costs.flops)

    text = partitioner_failure(Flops, max_units=3)
    assert "split raised TypeError" in text and "the engine gives FLOPs only to a partitioner with needs_flops = True" in text
    Flops.needs_flops = True
    check_partitioner(Flops)


def test_attributes_the_engine_reads_are_checked():
    class Odd(Even):
        name = 3
        needs_costs = "yes"
        cost_batch_size = 0
        balances = 1.0

    text = partitioner_failure(Odd, max_units=2)
    for line in ("'name' must be a string", "'needs_costs' must be True or False, not 'yes'",
                 "'cost_batch_size' must be None or a positive int, not 0", "'balances' must be a method"):
        assert line in text


# -- check_objective, check_decoder ---------------------------------------------------------------


class Linear:
    """Cross-entropy on a pooled linear head: a correct objective the broken ones below start from."""

    name = "linear"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options):
        self.options = options

    def head(self, spec):
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(spec.shape[0], spec.num_classes))

    def loss(self, z, y):
        return nn.functional.cross_entropy(z, y)

    def predict(self, z):
        return z.argmax(dim=1)


def objective_failure(objective) -> str:
    with pytest.raises(AssertionError) as err:
        check_objective(objective, profiles={"CIFAR": ((3, 32, 32), [(16, 32, 32), (32, 16, 16)])})
    return str(err.value)


def test_a_correct_objective_passes():
    check_objective(Linear)


def test_shared_heads_and_heads_holding_the_backbone_are_reported():
    class Shared(Linear):
        def __init__(self, options):
            super().__init__(options)
            self.cache = {}

        def head(self, spec):
            return self.cache.setdefault(spec.shape, super().head(spec))

    class HoldsUnits(Linear):
        def head(self, spec):  # AugLocal's idea without the copies
            tail = HeadSpec(spec.final_shape, spec.final_shape, spec.num_classes)
            return nn.Sequential(*spec.units[spec.last_unit + 1 :], super().head(tail))

    text = objective_failure(Shared)
    assert text.startswith("objective 'linear' (")
    assert "CIFAR: module 1 of 4, h 16x32x32: two calls of head(spec) share parameters; build a new head on every call" in text
    assert "module 1 of 4, h 16x32x32: the head holds the backbone's own units; copy them (copy.deepcopy)" in objective_failure(HoldsUnits)


def test_losses_must_be_finite_scalars_with_gradient_to_h_and_the_head_only():
    outside = torch.zeros(1, requires_grad=True)

    class Mean(Linear):
        def loss(self, z, y):
            return nn.functional.cross_entropy(z, y, reduction="none")

    class Loose(Linear):
        def loss(self, z, y):
            return super().loss(z, y) + outside.sum()

    class Frozen(Linear):
        def head(self, spec):
            return Detached(super().head(spec))

    class NaN(Linear):
        def loss(self, z, y):
            return super().loss(z, y) * float("nan")

    assert "loss returned (8,); expected a floating scalar tensor (shape ())" in objective_failure(Mean)
    assert "the loss reaches a tensor of shape (1,) that is neither h nor a parameter of the head" in objective_failure(Loose)
    assert "the loss gives h no (finite) gradient" in objective_failure(Frozen)
    assert "loss is nan; expected a finite number" in objective_failure(NaN)


class Detached(nn.Module):
    """A head that cuts the graph to its input: the module before it would never learn."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, h):
        return self.inner(h.detach())


def test_predictions_are_none_or_labels_of_the_batch():
    class Probabilities(Linear):
        def predict(self, z):
            return z.softmax(dim=1)

    class TooLarge(Linear):
        def predict(self, z):
            return z.argmax(dim=1) + 10

    assert "(train mode): predict returned (8, 10) torch.float32; expected None or integer labels of shape (8,)" in objective_failure(Probabilities)
    assert "predict returned labels outside 0..9" in objective_failure(TooLarge)


class Upsample:
    """A 1x1 conv back to x's channels and bilinear upsampling, MSE: a correct decoder."""

    name = "upsample"

    @attrs.frozen
    class Options:
        weight: float = 0.5

    def __init__(self, options):
        self.options = options

    def build(self, feature_shape, info):
        return nn.Sequential(nn.Conv2d(feature_shape[0], info.input_shape[0], 1), nn.Upsample(size=tuple(info.input_shape[1:]), mode="bilinear"))

    def loss(self, reconstruction, x, info):
        return nn.functional.mse_loss(reconstruction, x)

    def weights(self, module, num_modules):
        return (self.options.weight, 1.0)


def test_a_correct_decoder_passes_and_broken_ones_are_reported():
    class Small(Upsample):
        def build(self, feature_shape, info):
            return nn.Conv2d(feature_shape[0], info.input_shape[0], 1)

    class NoLoss(Upsample):
        def weights(self, module, num_modules):
            return (0.0, 0.0) if module == num_modules - 1 else (1.0, 1.0)

    check_decoder(Upsample)
    with pytest.raises(AssertionError) as err:
        check_decoder(Small)
    assert "CIFAR ResNet, 32x32: h 32x16x16 to x 3x32x32: the decoder returned shape (8, 3, 16, 16); expected (8, 3, 32, 32)" in str(err.value)
    with pytest.raises(AssertionError, match=r"module 2, K = 3: weights returned \(0, 0\): the module would get no loss at all"):
        check_decoder(NoLoss, max_modules=4)
    with pytest.raises(AssertionError, match=r"weights returned \(-1.0, 1.0\); expected"):
        check_decoder(Upsample(Upsample.Options(weight=-1.0)))


# -- contsup.testing.strategies -----------------------------------------------------------------


def test_strategies_need_hypothesis_and_the_checkers_do_not():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import contsup.testing\n"
        "try:\n    import contsup.testing.strategies\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "contsup.testing.strategies needs hypothesis, which contsup does not install: pip install hypothesis"

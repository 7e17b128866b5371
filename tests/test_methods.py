"""Training methods through the method hooks: MAN's moving-average copy follows the live unit
exactly and learns nothing from the losses; HPFF's pair loss reaches exactly modules l-1 and l;
each method refuses what it cannot do in one line."""

from __future__ import annotations

import re

import pytest
import torch

from contsup.config.recipe import RecipeError, loads_recipe
from contsup.model.components import training_method
from contsup.model.network import build_network
from contsup.training.strategies import GreedyStrategy, StepStats
from contsup_methods import HPFF

from conftest import ROOT
from tiny import one_thread, tiny_recipe_text  # noqa: F401  (one_thread: autouse fixture)


def _recipe(registries, tmp_path, extra: str, **kwargs):
    return loads_recipe(tiny_recipe_text(tmp_path, extra=extra, **kwargs), registries, source="method.toml")


def _batches(n: int):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        yield torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)


def _no_check(_module, _loss) -> None:
    pass


def test_man_moves_its_copy_towards_the_live_unit_exactly(registries, tmp_path):
    """After every step EMA_l = m * EMA_l + (1 - m) * u_l, u_l as it was before module l+1 stepped
    on that batch (to the bit); EMA_l gets no gradient and is in no optimizer; LB_l learns."""
    recipe = _recipe(registries, tmp_path, "\n[man]\nmomentum = 0.9\nema_init = \"random\"\n", modules=4, context="R1E")
    torch.manual_seed(0)
    network = build_network(recipe).network.train()
    strategy = GreedyStrategy(network, recipe.optimizer.create(), recipe.schedule.create(), 10, 10, method=training_method(recipe))
    local = list(network.blocks)[:-1]
    assert all(m.part is not None for m in local) and network.blocks[-1].part is None
    optimised = {id(q) for u in strategy.updates for g in u.optimizer.param_groups for q in g["params"]}
    for m in local:
        assert not any(id(q) in optimised for q in m.part.ema.parameters())
        assert all(id(q) in optimised for q in m.part.lb.parameters())
    lb_before = [[q.detach().clone() for q in m.part.lb.parameters()] for m in local]
    for x, y in _batches(3):
        ema = [[q.detach().clone() for q in m.part.ema.parameters()] for m in local]
        live = [[q.detach().clone() for q in network.blocks[m.index].body[0].parameters()] for m in local]
        strategy.step(x, y, StepStats(network.num_modules), _no_check)
        for m, e0, u0 in zip(local, ema, live):
            for e, a, b in zip(m.part.ema.parameters(), e0, u0):
                assert torch.equal(e, a * 0.9 + b * (1 - 0.9))
                assert e.grad is None and not e.requires_grad
    assert all(any(not torch.equal(q, q0) for q, q0 in zip(m.part.lb.parameters(), before)) for m, before in zip(local, lb_before))


def test_man_copy_starts_as_the_live_unit_by_default(registries, tmp_path):
    recipe = _recipe(registries, tmp_path, "\n[man]\n", modules=3)
    network = build_network(recipe).network
    for m in list(network.blocks)[:-1]:
        live = network.blocks[m.index].body[0]
        assert all(torch.equal(e, q) for e, q in zip(m.part.ema.parameters(), live.parameters()))


class _OnlyModule(HPFF):
    """HPFF with every loss term but module ``only``'s switched off."""

    only = 0

    def terms(self, module, num_modules, total, extra):
        return super().terms(module, num_modules, total, extra) if module == self.only else (None, None)


def _reached(strategy, network, only: int) -> set[int]:
    """The modules whose parameters took gradient in one step where only module ``only`` has a loss."""
    strategy.method.only = only
    x, y = next(_batches(1))
    strategy.step(x, y, StepStats(network.num_modules), _no_check)
    return {m.index for m in network.blocks if any(q.grad is not None and bool(q.grad.abs().sum() > 0) for q in m.parameters())}


def assert_pair_reach(reached: set[int], module: int) -> None:
    assert reached == {module - 1, module}, f"module {module}'s pair loss reached modules {sorted(reached)}"


@pytest.mark.parametrize("module", [2, 3, 4])
def test_hpff_pair_loss_reaches_exactly_the_previous_module(registries, tmp_path, module):
    recipe = _recipe(registries, tmp_path, "\n[hpff]\nwx = 0.0\n", modules=5, context="R1E")
    torch.manual_seed(0)
    network = build_network(recipe).network.train()
    method = _OnlyModule(HPFF.Options(wx=0.0))
    strategy = GreedyStrategy(network, recipe.optimizer.create(), recipe.schedule.create(), 10, 10, method=method)
    assert_pair_reach(_reached(strategy, network, module), module)


def test_the_reach_check_fails_a_wider_reach(registries, tmp_path):
    """The two-stream form without its detached input: module 3's pair loss would reach module 1
    too, and the check says so."""
    recipe = _recipe(registries, tmp_path, "", modules=5, context="none")
    network = build_network(recipe).network.train()
    x, y = next(_batches(1))
    h = x
    for m in list(network.blocks)[:3]:
        h = m.body(h)  # modules 1..3 from x, nothing detached
    network.blocks[2].loss(h, y, x).total.backward()
    reached = {m.index for m in network.blocks if any(q.grad is not None and bool(q.grad.abs().sum() > 0) for q in m.parameters())}
    with pytest.raises(AssertionError, match="reached modules \\[1, 2, 3\\]"):
        assert_pair_reach(reached, 3)


def test_hpff_trains_module_one_through_module_two_only(registries, tmp_path):
    recipe = _recipe(registries, tmp_path, "\n[hpff]\n", modules=4)
    network = build_network(recipe).network.train()
    strategy = GreedyStrategy(network, recipe.optimizer.create(), recipe.schedule.create(), 10, 10, method=training_method(recipe))
    first_head = [q.detach().clone() for q in network.blocks[0].head.parameters()]
    first_body = [q.detach().clone() for q in network.blocks[0].body.parameters()]
    x, y = next(_batches(1))
    strategy.step(x, y, StepStats(network.num_modules), _no_check)
    assert all(torch.equal(q, q0) for q, q0 in zip(network.blocks[0].head.parameters(), first_head))  # no loss of its own
    assert any(not torch.equal(q, q0) for q, q0 in zip(network.blocks[0].body.parameters(), first_body))  # module 2's pair loss
    assert [m.part is not None for m in network.blocks] == [False, True, True, False]


@pytest.mark.parametrize("table", ["[man]", "[hpff]", "[backlink]\nunits = 1"])
def test_methods_are_refused_in_a_pipeline_and_end_to_end_in_one_line(registries, tmp_path, table):
    name = table.split("]")[0][1:]
    with pytest.raises(RecipeError) as exc:
        _recipe(registries, tmp_path, f"\n{table}\n[distributed]\nmode = \"pipeline\"\n", modules=4)
    assert [p for p in exc.value.problems if "pipeline" in p and f"'{name}'" in p]
    with pytest.raises(RecipeError) as exc:
        _recipe(registries, tmp_path, f"\n{table}\n", modules=4, mode="e2e")
    assert [p for p in exc.value.problems if "run.mode = \"greedy\"" in p and f"'{name}'" in p]


def test_one_method_at_a_time(registries, tmp_path):
    with pytest.raises(RecipeError) as exc:
        _recipe(registries, tmp_path, "\n[man]\n[hpff]\n", modules=4)
    assert any("[hpff], [man]" in p and "one method at a time" in p for p in exc.value.problems)
    assert _recipe(registries, tmp_path, "\n[man]\n[backlink]\nunits = 0\n", modules=4).method.use == "man"
    with pytest.raises(RecipeError) as exc:
        _recipe(registries, tmp_path, "\n[mann]\n", modules=4)
    assert any("mann: unknown section" in p and "man" in p for p in exc.value.problems)


def test_a_copy_of_a_fake_unit_is_fake_and_warns_nothing():
    """contsup plan builds MAN's copies from fake units (fresh_copy); torch's deep copy of a fake
    tensor warns about its data pointer, which would show in every plan of a recipe with MAN."""
    import gc
    import warnings

    from torch import nn
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from contsup.layers import fresh_copy

    with FakeTensorMode(allow_non_fake_inputs=True):
        unit = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        with warnings.catch_warnings(record=True) as caught:  # recorded, not raised: an exception
            warnings.simplefilter("always")  # raised inside torch's dispatch can leave it broken
            twin = fresh_copy(unit)
    assert isinstance(twin[0].weight, FakeTensor) and twin[0].weight is not unit[0].weight
    assert [str(w.message) for w in caught] == []
    del unit, twin
    gc.collect()


METHODS_MD = ROOT / "docs" / "plugins" / "methods.md"
OPTIONAL = ("part", "link", "terms", "after_step", "prepare", "pipeline_refusal", "switch", "plan_note", "describe", "label")


def test_every_method_hook_is_documented():
    """Each hook the Method protocol names has its section (or its line) in docs/plugins/methods.md."""
    from contsup.protocols import Method

    named = set(re.findall(r"^\s*- ``(\w+)", Method.__doc__, flags=re.M))
    assert named == set(OPTIONAL) - {"label"}  # label is described with describe
    text = METHODS_MD.read_text()
    for hook in ("active", "part", "link", "terms", "after_step", "prepare"):
        assert re.search(rf"^### `{hook}\(", text, flags=re.M), f"methods.md has no '### `{hook}(...)`' section"
    described = text.split("### Class attributes", 1)[1].split("\n## ", 1)[0]
    for attribute in ("pipeline_refusal", "switch", "plan_note", "describe", "label"):
        assert f"`{attribute}" in described, f"methods.md's class attributes do not describe `{attribute}`"


def test_the_reference_table_lists_each_builtin_methods_hooks():
    """The built-in methods' row in methods.md names every optional hook the class defines."""
    from contsup_methods import HPFF, MAN, BackLink

    rows = dict(re.findall(r"^\| (\w+), `\[\w+\][^|]*\| ([^|]+) \|", METHODS_MD.read_text(), flags=re.M))
    for cls in (BackLink, MAN, HPFF):
        defined = {hook for hook in OPTIONAL if hasattr(cls, hook)}
        shown = set(re.findall(r"`(\w+)`", rows[cls.__name__]))
        assert defined <= shown, f"methods.md's row for {cls.__name__} leaves out {sorted(defined - shown)}"

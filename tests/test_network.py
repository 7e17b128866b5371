"""The built network: gradient isolation, detached context, no in-place context, plans, and
greedy K=1 equal to end-to-end training step for step."""

from __future__ import annotations

import pytest
import torch

from contsup.training.loop import Trainer
from contsup.training.strategies import STRATEGIES, StepStats, e2e_parameters
from contsup.errors import ContsupError
from contsup.model.network import build_network, plan_modules
from contsup.types import Source


def module_params(m):
    return {id(p) for p in m.parameters()}


@pytest.mark.filterwarnings("ignore:Seems like .optimizer.step")
@pytest.mark.parametrize("context", ["none", "R1E", "M2R1E", "all"])
def test_each_local_loss_updates_its_own_module_only(small_recipe, tmp_path, context):
    recipe = small_recipe(modules=5, context=context)
    trainer = Trainer(recipe, tmp_path, log=open("/dev/null", "w"))
    network = trainer.network
    all_params = list(network.parameters())
    seen = []
    for m, opt in zip(network.blocks, trainer.strategy.optimizers):
        own = module_params(m)

        def zero_grad(set_to_none=True, _own=own):
            for p in all_params:
                p.grad = None

        def step(*args, _m=m, _own=own, **kwargs):
            with_grad = {id(p) for p in all_params if p.grad is not None}
            assert with_grad <= _own, f"module {_m.index}'s loss reached another module"
            body_and_head = module_params(_m.body) | module_params(_m.head) | module_params(_m.adapters)
            assert with_grad == body_and_head, f"module {_m.index}: some of its own parameters got no gradient"
            seen.append(_m.index)

        opt.zero_grad = zero_grad
        opt.step = step
    x, y = next(iter(trainer.train_loader))
    trainer.strategy.step(x, y, StepStats(network.num_modules), lambda *_: None)
    assert seen == list(range(1, 6))


def test_context_is_added_into_a_new_tensor(small_recipe):
    torch.manual_seed(0)
    network = build_network(small_recipe(modules=4, context="R1E")).network
    m = network.blocks[2]
    assert [str(s) for s in m.sources] == ["x", "h1"]
    x = torch.randn(2, 3, 16, 16)
    outs = network.module_outputs(x)
    h = outs[1].clone()
    h_in = outs[1]
    hc = m.enrich(h_in, [x, outs[0]])  # h1^c has the shape of module 1's output
    assert hc is not h_in and torch.equal(h_in, h)


def test_plan_for_resnet32_k16_r1e(registries):
    from contsup.config.recipe import loads_recipe

    text = """
[data]
use = "digits"
[backbone]
use = "cifar_resnet32"
[partition]
modules = 16
[context]
use = "R1E"
"""
    built = build_network(loads_recipe(text, registries))
    plans = built.plans
    assert [p.units for p in plans] == [1] * 16
    assert [str(s) for s in plans[0].sources] == []
    for p in plans[1:]:
        assert [str(s) for s in p.sources] == ["x", f"h{p.index - 2}"]
    assert plans[0].output_shape == (16, 32, 32) and plans[6].output_shape == (32, 16, 16) and plans[-1].output_shape == (64, 8, 8)
    for m, p in zip(built.network.blocks, plans):
        for s in p.sources:
            source_shape = built.info.input_shape if s.is_input else plans[s.index].input_shape
            out = m.adapters[str(s)](torch.zeros(2, *source_shape))
            assert tuple(out.shape[1:]) == p.input_shape


def test_bad_selector_answers_are_clear_errors():
    class Bad:
        name = "bad"

        def __init__(self, answer):
            self.answer = answer

        def sources(self, module, num_modules):
            return self.answer if module == 3 else ()

    shapes = [(4, 8, 8)] * 4
    for answer, message in [
        ((Source.feature(2),), "may use x and h0..h1"),
        ((Source.input(), Source.input()), "twice"),
        (("x",), "expected a contsup.types.Source"),
    ]:
        with pytest.raises(ContsupError, match=message):
            plan_modules((1, 1, 1, 1), shapes, (3, 8, 8), [Bad(answer)] * 4)


def test_module_one_gets_no_context_not_even_the_input():
    class InputEverywhere:
        name = "input_everywhere"

        def sources(self, module, num_modules):
            return (Source.input(),)

    with pytest.raises(ContsupError, match="gave module 1 the source x; module 1 gets no context"):
        plan_modules((1, 1), [(4, 8, 8)] * 2, (3, 8, 8), [InputEverywhere()] * 2)


def test_greedy_k1_equals_end_to_end_step_for_step(small_recipe, tmp_path):
    greedy = Trainer(small_recipe(modules=1, context="none", mode="greedy"), tmp_path / "g", log=open("/dev/null", "w"))
    e2e = Trainer(small_recipe(modules=1, context="none", mode="e2e"), tmp_path / "e", log=open("/dev/null", "w"))
    assert [id(p) for p in e2e_parameters(e2e.network)] != []
    for (xg, yg), (xe, ye) in zip(greedy.train_loader, e2e.train_loader):
        assert torch.equal(xg, xe) and torch.equal(yg, ye)
        greedy.strategy.step(xg, yg, StepStats(1), lambda *_: None)
        e2e.strategy.step(xe, ye, StepStats(1), lambda *_: None)
        for (name, pg), (_, pe) in zip(greedy.network.state_dict().items(), e2e.network.state_dict().items()):
            assert torch.equal(pg, pe), name


def test_inference_matches_the_training_path(small_recipe):
    torch.manual_seed(0)
    network = build_network(small_recipe(modules=4, context="M1R1E")).network.eval()
    x = torch.randn(3, 3, 16, 16)
    store, h = network.store(x, detach=True), x
    with torch.no_grad():
        for m in network.blocks:
            hc = m.enrich(h, store.gather(m.sources))
            store.add(m.index - 1, hc)
            h = m.body(hc)
            store.release(m.index)
        expected = network.blocks[-1].head(h)
        assert torch.equal(network(x), expected)


def test_strategies_are_the_two_modes():
    assert set(STRATEGIES) == {"greedy", "e2e"}


def test_the_core_names_no_builtin_plugin():
    """contsup/ knows no concrete component: it reaches the built-ins only through the loader's
    BUILTIN_PLUGINS list. The paper's M_E / M_R, the fallback of a selector that builds no adapter
    of its own (network.make_adapter), live in the plugin API (contsup.adapters)."""
    import ast

    from conftest import ROOT

    packages = {p.name for p in (ROOT / "plugins").iterdir() if p.name.startswith("contsup_")}
    found = []
    for path in sorted((ROOT / "contsup").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        listed = set()
        for node in ast.walk(tree):  # the loader's list itself
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "BUILTIN_PLUGINS" for t in node.targets):
                listed |= {id(c) for c in ast.walk(node.value)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in listed:
                names = [node.value]  # import_module("contsup_...")
            else:
                continue
            found += [(path.relative_to(ROOT).as_posix(), n) for n in names if n.split(".")[0] in packages]
    assert found == []

"""BackLink ([backlink] units = N): module l+1's loss also trains the last N units of module l,
and nothing earlier; N = 0 is plain greedy training, step for step."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from contsup.cli import main
from contsup.tools.plan import plan_data
from contsup.config.recipe import RecipeError, loads_recipe
from contsup.model.network import build_network
from contsup.training.loop import Trainer
from contsup.training.strategies import GreedyStrategy, StepStats, split_body

from contsup_methods import BackLink

from tiny import one_thread, tiny_recipe_text, validate_plan_and_train_a_digits_epoch, without_measured  # noqa: F401  (one_thread: autouse fixture)


def backlink_units(recipe) -> int:
    """The recipe's [backlink] units (0 without the table)."""
    return next((m.options.units for m in recipe.methods if m.use == "backlink"), 0)


def _recipe(registries, tmp_path, extra: str = "", **kwargs):
    return loads_recipe(tiny_recipe_text(tmp_path, extra=extra, **kwargs), registries, source="tiny.toml")


def _no_check(_module: int, _loss: torch.Tensor) -> None:
    pass


def _fit(recipe, run_dir):
    trainer = Trainer(recipe, run_dir, log=open(os.devnull, "w"))
    metrics = trainer.fit()
    return trainer.network.state_dict(), without_measured(metrics)


def test_units_0_trains_exactly_as_plain_greedy(registries, tmp_path):
    (wa, ma), (wb, mb) = (
        _fit(_recipe(registries, tmp_path, extra=extra, epochs=2), tmp_path / name)
        for name, extra in (("plain", ""), ("zero", "\n[backlink]\nunits = 0\n"))
    )
    assert wa.keys() == wb.keys() and ma == mb
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    # and BackLink does change the training
    wc, _ = _fit(_recipe(registries, tmp_path, extra="\n[backlink]\nunits = 1\n", epochs=2), tmp_path / "one")
    assert any(not torch.equal(wa[key], wc[key]) for key in wa)


def test_recipe_option_validates_and_refuses_what_it_cannot_do(registries, tmp_path):
    assert backlink_units(_recipe(registries, tmp_path)) == 0
    assert backlink_units(_recipe(registries, tmp_path, extra="\n[backlink]\nunits = 2\n")) == 2
    with pytest.raises(RecipeError) as exc:
        _recipe(registries, tmp_path, extra="\n[backlink]\nunits = -1\n")
    assert any("backlink.units" in p for p in exc.value.problems)
    with pytest.raises(RecipeError) as exc:
        _recipe(registries, tmp_path, extra="\n[backlink]\nunits = 1\n[distributed]\nmode = \"pipeline\"\n")
    assert any("backlink.units" in p and "pipeline" in p for p in exc.value.problems)
    with pytest.raises(RecipeError) as exc:
        _recipe(registries, tmp_path, mode="e2e", extra="\n[backlink]\nunits = 1\n")
    assert any("backlink.units" in p and "greedy" in p for p in exc.value.problems)


def _grads_at_step(strategy: GreedyStrategy) -> list[dict[int, torch.Tensor | None]]:
    """Hooks recording, per module, every parameter's gradient as its optimizer steps."""
    seen: list[dict[int, torch.Tensor | None]] = [{} for _ in strategy.optimizers]

    def hook(i):
        def record(opt, _args, _kwargs):
            for group in opt.param_groups:
                for p in group["params"]:
                    seen[i][id(p)] = None if p.grad is None else p.grad.clone()
        return record

    for i, opt in enumerate(strategy.optimizers):
        opt.register_step_pre_hook(hook(i))
    return seen


def _reference_grads(network, x, y, units: int):
    """Per module l: (its own loss's gradients, module l+1's loss's gradients on module l's
    parameters with module l's input detached, so reaching every unit of module l)."""
    store = network.store(x, detach=True)
    blocks = list(network.blocks)
    own, link = [], []
    h = x
    outs = []
    for m in blocks:
        hc = m.enrich(h.detach(), store.gather(m.sources))
        store.add(m.index - 1, hc)
        out = m.body(hc)
        outs.append((hc, out))
        params = list(m.parameters())
        g = torch.autograd.grad(m.loss(out, y, x).total, params, allow_unused=True, retain_graph=True)
        own.append(dict(zip(map(id, params), g)))
        if m.index > 1:  # module m's loss on module m-1 through h_{m-1}, undetached
            prev = blocks[m.index - 2]
            hc_linked = m.enrich(outs[-2][1], store.gather(m.sources))
            loss = m.loss(m.body(hc_linked), y, x).total
            pp = list(prev.parameters())
            link.append(dict(zip(map(id, pp), torch.autograd.grad(loss, pp, allow_unused=True))))
        store.release(m.index)
        h = out
    link.append({})
    return own, link


@pytest.mark.parametrize("units", [1, 2])
def test_next_loss_reaches_exactly_the_last_units(registries, tmp_path, units):
    recipe = _recipe(registries, tmp_path, extra=f"\n[backlink]\nunits = {units}\n", modules=3, context="R1E")
    torch.manual_seed(0)
    network = build_network(recipe).network.train()
    reference = copy.deepcopy(network)
    strategy = GreedyStrategy(network, recipe.optimizer.create(), recipe.schedule.create(), 10, 10,
                              method=BackLink(BackLink.Options(units=units)))
    seen = _grads_at_step(strategy)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    strategy.step(x, y, StepStats(3), _no_check)
    own, link = _reference_grads(reference, x, y, units)
    for l, (m, ref_m) in enumerate(zip(network.blocks, reference.blocks)):
        _, suffix = split_body(ref_m, units)
        span = {id(p) for p in suffix.parameters()}
        assert span or l == len(network.blocks) - 1
        reached_earlier = False
        for p, ref_p in zip(m.parameters(), ref_m.parameters()):
            got = seen[l][id(p)]
            g_own, g_link = own[l][id(ref_p)], link[l].get(id(ref_p))
            expected = g_own
            if id(ref_p) in span and g_link is not None:
                expected = g_link if g_own is None else g_own + g_link
            elif g_link is not None and g_link.abs().sum() > 0:
                reached_earlier = True  # the full link would reach it: BackLink must not
            if expected is None:
                assert got is None or not got.any()
            else:
                assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), (l + 1, [n for n, q in m.named_parameters() if q is p])
        if l < len(network.blocks) - 1:
            assert reached_earlier  # the test distinguishes the span from the whole module
            assert any(link[l][i] is not None and link[l][i].abs().sum() > 0 for i in span)


def test_plan_shows_the_span_and_counts_its_memory(registries, tmp_path, capsys):
    base = _recipe(registries, tmp_path, modules=3)
    linked = _recipe(registries, tmp_path, extra="\n[backlink]\nunits = 1\n", modules=3)
    plain, data = plan_data(base), plan_data(linked)
    assert [m.get("backlink") for m in plain["modules"]] == [None, None, None]
    spans = [m["backlink"] for m in data["modules"]]
    assert spans[0]["unit_range"] == [plain["modules"][0]["unit_range"][1]] * 2 and spans[2] is None
    assert spans[0]["trained_by"] == 2
    for a, b in zip(plain["modules"][1:], data["modules"][1:]):
        assert b["memory"]["backlink_bytes"] > 0
        assert b["memory"]["bytes"] == a["memory"]["bytes"] + b["memory"]["backlink_bytes"]
    assert data["modules"][0]["memory"]["backlink_bytes"] == 0
    path = tmp_path / "linked.toml"
    path.write_text(tiny_recipe_text(tmp_path, modules=3, extra="\n[backlink]\nunits = 1\n"))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "backlink" in out.lower()
    assert main(["plan", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["modules"][0]["backlink"]["units"] == 1


def test_validates_plans_and_trains_a_tiny_digits_epoch(registries, tmp_path, capsys):
    validate_plan_and_train_a_digits_epoch(tmp_path, "\n[backlink]\nunits = 1\n", "digits_backlink.toml", "backlink", capsys)


def test_profile_notes_the_linked_memory(registries, tmp_path):
    from contsup.tools.profiling import profile_data, profile_text
    from contsup.tools.tables import format_table as _table

    plain = profile_data(_recipe(registries, tmp_path, modules=3), repeats=1)
    data = profile_data(_recipe(registries, tmp_path, extra="\n[backlink]\nunits = 1\n", modules=3), repeats=1)
    assert plain.get("backlink") is None
    link = data["backlink"]
    assert link["linked_bytes"][0] == 0 and all(b > 0 for b in link["linked_bytes"][1:])
    assert link["linked_bytes"][1] == data["units"][data["modules"][0]["unit_range"][1]]["bytes"]
    assert link["peak_bytes"] >= data["predicted_peak_bytes"]
    assert "backlink (1 unit)" in profile_text(data, _table)


def test_memory_balanced_sees_the_link(registries, tmp_path):
    """The partitioner's cost table carries the linked units (the previous module's last N,
    fewer where it has fewer): the module figures are the unlinked ones plus exactly those, the
    table is exact for the split it was made from, and memory_balanced's table for its own split."""
    from contsup.model.build import recipe_parts
    from contsup.model.costs import CostModel, even_split
    from contsup.model.fitting import fitted_costs
    from contsup.partition import min_max_split

    def model_for(extra: str) -> CostModel:
        recipe = _recipe(registries, tmp_path, extra=extra, modules=4)
        parts, shapes, info = recipe_parts(recipe)
        return CostModel(recipe, parts, shapes, info)

    plain, linked = model_for(""), model_for("\n[backlink]\nunits = 2\n")
    even = even_split(linked.n, 4)
    costs = linked.plan_costs(even)
    assert [c.breakdown["backlink"] for c in costs][0] == 0
    for c, start in zip(costs[1:], [0] + [sum(even[:m]) for m in range(1, 3)]):
        span = range(max(start, c.unit_range[0] - 2), c.unit_range[0])
        assert c.breakdown["backlink"] == sum(linked.unit_bytes(u) for u in span) > 0
    assert [c.bytes for c in costs] == [p.bytes + c.breakdown["backlink"] for p, c in zip(plain.plan_costs(even), costs)]
    table = linked.costs(4, like=even)
    starts = [0, *[sum(even[:m]) for m in range(1, 4)]]
    assert [table.segment(s, s + n - 1) for s, n in zip(starts, even)] == [float(c.bytes) for c in costs]
    fitted = fitted_costs(linked, min_max_split, 4)
    sizes = min_max_split(fitted, 4)
    assert max(fitted.segment(s, s + n - 1) for s, n in zip([0, *[sum(sizes[:m]) for m in range(1, 4)]], sizes)) == linked.peak(sizes)

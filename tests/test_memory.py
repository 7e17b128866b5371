"""Activation-memory accounting: unique saved storages, parameters left out, determinism; the
composed prediction against a real greedy step; greedy against end-to-end; measured costs reach
the partitioner without touching the RNG, and only when it asks for them."""

from __future__ import annotations

import attrs
import pytest
import torch
from torch import nn

import contsup.model.costs as memory  # the cost model (CostModel)
import contsup.model.saved as saved
from contsup.training.strategies import EndToEndStrategy, GreedyStrategy
from contsup.model.build import recipe_parts
from contsup.model.costs import CostModel, even_split
from contsup.model.fitting import fitted_costs, partition_costs
from contsup.model.saved import SavedStorages
from contsup.training.measure import measure_live, measure_step
from contsup.model.network import build_network
from contsup.types import Costs
from contsup_partition import min_max_split, split_peak


def count(fn, *modules):
    with SavedStorages(saved.module_tensors(*modules)) as rec:
        out = fn()
    return rec.total(), out


def test_an_inplace_relu_shares_its_storage_with_the_next_conv():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(2, 3, 8, 8)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        net(x)
    activations = [t for t in packed if not isinstance(t, nn.Parameter)]
    assert len(activations) == 3  # x by conv1; the ReLU's result; the same tensor as conv2's input
    total, _ = count(lambda: net(x), net)
    assert total == x.nbytes + 2 * 4 * 8 * 8 * 4  # x and conv1's output, once


def test_views_of_one_storage_count_once_and_parameters_not_at_all():
    lin = nn.Linear(16, 16)
    leaf = torch.randn(4, 16, requires_grad=True)
    h = leaf.clone()
    # mm saves the input and a transposed view of the weight; mul saves both of its views of h
    total, _ = count(lambda: lin(h) * h.view(4, 16) * h[:, :].view(4, 16), lin)
    assert total == h.nbytes + 4 * 16 * 4 * 2  # h once, lin's output and the first product


def test_counts_are_deterministic(small_recipe):
    recipe = small_recipe(modules=4, context="R1E", batch_size=4)
    parts, shapes, info = recipe_parts(recipe)
    a = CostModel(recipe, parts, shapes, info)
    b = CostModel(recipe, parts, shapes, info)
    assert a.units == b.units
    assert a.costs() == b.costs()
    x = torch.randn(4, 3, 16, 16)
    twice = [count(lambda: parts.units[1](parts.units[0](x)), *parts.units[:2])[0] for _ in range(2)]
    assert twice[0] == twice[1] > 0


def greedy_and_e2e(recipe, costs=None):
    torch.manual_seed(0)
    built = build_network(recipe, costs=costs)
    opt, sched = recipe.optimizer.create(), recipe.schedule.create()
    return built, GreedyStrategy(built.network, opt, sched, 10, 10)


def batch(recipe):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(recipe.data.batch_size, 3, 16, 16, generator=gen), torch.randint(0, 10, (recipe.data.batch_size,), generator=gen)


@pytest.mark.parametrize("context", ["none", "E", "R1E", "M2R1E", "all"])
def test_prediction_equals_a_real_greedy_step(small_recipe, context):
    base = small_recipe(modules=4, context=context, batch_size=4)
    parts, shapes, info = recipe_parts(base)
    model = CostModel(base, parts, shapes, info)
    assert_predictions_hold(model, base)


def assert_predictions_hold(model, base):
    """For the uniform and the memory-balanced split of ``base``: each module's predicted bytes
    equal those a real greedy step saves; returns the last split's predicted costs."""
    for partitioner in ("uniform", "memory_balanced"):
        recipe = attrs.evolve(base, partitioner=_partitioner(base, partitioner))
        built, greedy = greedy_and_e2e(recipe)
        predicted = model.plan_costs([p.units for p in built.plans])
        measured = measure_step(greedy, *batch(recipe))
        assert [c.bytes for c in predicted] == measured, partitioner
    return predicted


@pytest.mark.parametrize("context", ["R1E", "all"])
def test_with_recompute_the_prediction_is_what_the_forward_keeps(small_recipe, context):
    """context.recompute: each module's predicted bytes leave out its adapters' own activations and
    count their inputs, which the recomputation keeps. Each is what a real greedy step holds when
    that module's backward starts (the step's other backward passes are the adapters'
    recomputations), the largest is the step's forward peak, and memory_balanced splits on them."""
    base = small_recipe(modules=4, context=f'{context}"\nrecompute = true\n#', batch_size=4)
    parts, shapes, info = recipe_parts(base)
    model = CostModel(base, parts, shapes, info)
    kept = CostModel(attrs.evolve(base, context_options=attrs.evolve(base.context_options, recompute=False)), parts, shapes, info)
    for partitioner in ("uniform", "memory_balanced"):
        recipe = attrs.evolve(base, partitioner=_partitioner(base, partitioner))
        built, greedy = greedy_and_e2e(recipe)
        sizes = [p.units for p in built.plans]
        predicted = [c.bytes for c in model.plan_costs(sizes)]
        assert set(predicted) <= set(measure_step(greedy, *batch(recipe))), partitioner
        assert max(predicted) == measure_live(greedy, *batch(recipe))["forward"], partitioner
        assert all(p < c.bytes for p, c in zip(predicted[1:], kept.plan_costs(sizes)[1:]))  # modules 2..K have adapters


# top level: DGL without a decoder; the [[modules]] ranges give context, a decoder and supcon
HYBRID = """
[[modules]]
range = [1, 1]
context = { use = "none" }
decoder = { use = "infopro", ixx_1 = 1.0, ixy_1 = 1.0, ixx_2 = 0.0, ixy_2 = 1.0 }

[[modules]]
range = [2, 4]
context = { use = "M1R1E" }
objective = { use = "supcon", temperature = 0.1 }
"""


def test_prediction_equals_a_real_greedy_step_per_modules_range(registries):
    from contsup.config.recipe import loads_recipe

    from conftest import small_recipe_text

    base = loads_recipe(small_recipe_text(modules=4, context="none", batch_size=4) + HYBRID, registries, source="h.toml")
    parts, shapes, info = recipe_parts(base)
    model = CostModel(base, parts, shapes, info)
    assert [[str(s) for s in srcs] for srcs in model.sources(4)] == [[], ["x", "h0"], ["x", "h0", "h1"], ["x", "h1", "h2"]]
    predicted = assert_predictions_hold(model, base)
    assert predicted[0].breakdown["adapters"] == 0 < predicted[1].breakdown["adapters"]
    with pytest.raises(ValueError, match="ranges are for K = 4"):
        model.costs(3)


def _partitioner(recipe, name):
    from contsup.core.plugins import get_plugin_manager
    from contsup.config.schema import Chosen
    from contsup.core.registry import Registries

    entry = Registries.from_plugin_manager(get_plugin_manager(entry_points=False)).partitioners.entry(name)
    return Chosen(name, entry.component, entry.component.Options(), entry.plugin)


@pytest.mark.parametrize("context", ["none", "R1E"])
def test_greedy_peak_is_below_end_to_end_for_resnet20_k4(small_recipe, context):
    recipe = small_recipe(modules=4, context=context, batch_size=4)
    _, greedy = greedy_and_e2e(recipe)
    torch.manual_seed(0)
    plain = build_network(attrs.evolve(recipe, partition=attrs.evolve(recipe.partition, modules=1))).network
    e2e = EndToEndStrategy(plain, recipe.optimizer.create(), recipe.schedule.create(), 10, 10)
    x, y = batch(recipe)
    greedy_peak = max(measure_step(greedy, x, y))
    (e2e_peak,) = measure_step(e2e, x, y)
    assert greedy_peak < e2e_peak
    assert len(measure_step(greedy, x, y)) == 4  # one backward per module


@pytest.mark.parametrize("context", ["none", "R1E", "M1R1E"])
def test_memory_balanced_is_exact_for_its_split_and_not_above_uniform(small_recipe, context):
    recipe = small_recipe(modules=4, context=context, batch_size=4)
    parts, shapes, info = recipe_parts(recipe)
    model = CostModel(recipe, parts, shapes, info)
    for k in (1, 2, 3, 4, 6, 10):
        costs = fitted_costs(model, min_max_split, k)
        sizes = min_max_split(costs, k)
        assert split_peak(costs, sizes) == model.peak(sizes)  # the table is exact where it matters
        assert model.peak(sizes) <= model.peak(even_split(model.n, k))
    even = even_split(model.n, 4)
    assert split_peak(model.costs(4), even) == model.peak(even)  # the default table: exact for uniform


def test_measuring_costs_leaves_the_rng_and_the_weights_alone(small_recipe):
    recipe = small_recipe(modules=3, context="R1E", batch_size=4)
    recipe = attrs.evolve(recipe, partitioner=_partitioner(recipe, "memory_balanced"))
    parts, shapes, info = recipe_parts(recipe)
    costs = partition_costs(recipe.partitioner.create(), recipe, parts, shapes, info)
    torch.manual_seed(0)
    measured = build_network(recipe).network.state_dict()
    after_measured = torch.rand(3)
    torch.manual_seed(0)
    given = build_network(recipe, costs=costs).network.state_dict()
    after_given = torch.rand(3)
    assert torch.equal(after_measured, after_given)
    assert measured.keys() == given.keys()
    assert all(torch.equal(measured[k], given[k]) for k in measured)


def test_partitioners_that_ignore_costs_do_not_pay_for_measurement(small_recipe, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("uniform needs no measurement")

    monkeypatch.setattr(memory.CostModel, "__init__", refuse)
    recipe = small_recipe(modules=3)
    assert [p.units for p in build_network(recipe).plans] == [3, 3, 4]
    with pytest.raises(AssertionError):
        build_network(attrs.evolve(recipe, partitioner=_partitioner(recipe, "memory_balanced")))


def test_costs_table_shape(small_recipe):
    recipe = small_recipe(modules=4, context="R1E", batch_size=4)
    parts, shapes, info = recipe_parts(recipe)
    costs = CostModel(recipe, parts, shapes, info).costs()
    n = len(shapes)
    assert isinstance(costs, Costs) and len(costs.units) == n and min(costs.units) > 0
    assert [len(row) for row in costs.overhead] == [n - i for i in range(n)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_measurement_runs(small_recipe):
    recipe = small_recipe(modules=4, context="R1E", batch_size=8)
    parts, shapes, info = recipe_parts(recipe)
    model = CostModel(recipe, parts, shapes, info, device="cuda", method="cuda", timing=True, repeats=1)
    costs = model.plan_costs(even_split(model.n, 4))
    assert all(c.bytes > 0 and c.ms is not None for c in costs)


def test_a_memory_balanced_run_reloads(write_recipe, tmp_path):
    """The split is measured again on load; being deterministic, it rebuilds the same network."""
    import contsup
    from contsup.cli import main

    from conftest import small_recipe_text

    out_dir = tmp_path / "run"
    text = small_recipe_text(out_dir=str(out_dir), modules=3, context="R1E", batch_size=8, train_size=16)
    path = write_recipe(text.replace("[partition]\n", '[partition]\nuse = "memory_balanced"\n'))
    assert main(["train", str(path)]) == 0
    model = contsup.load_model(out_dir)
    assert [len(m.body) for m in model.blocks] != [3, 3, 4]  # not the uniform split
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


# -- contsup plan's memory figures ----------------------------------------------------------------


@pytest.mark.parametrize("context", ["none", "R1E"])
def test_the_plans_module_memory_equals_a_real_greedy_step(small_recipe, context):
    """What contsup plan reports per module is what a real greedy step keeps (at a batch it
    measures at, so no scaling)."""
    from contsup.tools.plan import plan_data

    recipe = small_recipe(modules=4, context=context, batch_size=4)
    data = plan_data(recipe)
    assert data["memory"]["measured_batch"] == data["memory"]["batch_size"] == 4
    _, greedy = greedy_and_e2e(recipe)
    assert [m["memory"]["bytes"] for m in data["modules"]] == measure_step(greedy, *batch(recipe))
    assert data["memory"]["largest_module_bytes"] == max(m["memory"]["bytes"] for m in data["modules"])
    parts = [m["memory"] for m in data["modules"]]
    assert all(p["adapter_bytes"] + p["body_bytes"] <= p["bytes"] for p in parts)
    assert (parts[1]["adapter_flops"] > 0) == (context == "R1E") and all(p["body_flops"] > 0 for p in parts)


IMAGENET_SCALE = """
[run]
seed = 0
[data]
use = "synthetic"
shape = [3, 224, 224]
classes = 10
train_size = 4
test_size = 2
batch_size = 2
[backbone]
use = "resnet50"
[partition]
modules = 4
[context]
use = "R1E"
encoder = "{encoder}"
shortcut = "{shortcut}"
"""


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["paper", "fast"])
def test_the_plan_warns_when_the_input_encoder_outweighs_the_modules_it_feeds(write_recipe, capsys, encoder):
    """The paper's encoder works at 224 x 224 with as many channels as the module: more than the
    ResNet-50 blocks it feeds; the ImageNet recipes' adapters (the fast encoder, the paper's
    pool-first M_R) do not."""
    from contsup.cli import main

    path = write_recipe(IMAGENET_SCALE.format(encoder=encoder, shortcut="paper"))
    assert main(["plan", str(path)]) == 0
    captured = capsys.readouterr()
    assert "activation memory kept for backward at batch 2" in captured.out
    warnings = [line for line in captured.err.splitlines() if "context adapters" in line]
    if encoder == "paper":
        assert len(warnings) == 1 and 'set context.encoder = "fast"' in warnings[0]
    else:
        assert warnings == []


# -- costs counted from shapes ------------------------------------------------------------------

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def pieces(model):
    """Every piece a cost model has measured, in the order it measured them."""
    return [*model.units, *model._heads.values(), *model._adapters.values()]


def assert_shapes_equal_saved(recipe, parts=None):
    parts_shapes_info = recipe_parts(recipe)
    parts = parts or parts_shapes_info[0]
    _, shapes, info = parts_shapes_info
    k = recipe.partition.modules
    models = {m: CostModel(recipe, parts, shapes, info, method=m) for m in ("saved", "shapes")}
    tables = {m: (model.costs(k), model.plan_costs(even_split(model.n, k))) for m, model in models.items()}
    assert pieces(models["shapes"]) == pieces(models["saved"])  # every unit, head and adapter, to the byte
    assert tables["shapes"] == tables["saved"]
    assert models["shapes"].notes == []
    return models["shapes"]


@pytest.mark.parametrize("path, overrides", [
    ("recipes/paper/resnet32_cifar10.toml", []),
    ("recipes/paper/resnet32_cifar10.toml", ["context.use=R1E"]),
    ("recipes/paper/resnet32_cifar10.toml", ["context.use=M2R1E", "context.encoder=fast"]),
    ("recipes/paper/resnet32_cifar10.toml", ["preset=paper", "context.use=all"]),
    ("recipes/paper/infopro/resnet32_cifar10_k4.toml", []),
    ("recipes/paper/resnet110_cifar10.toml", ["context.use=R1E"]),
    ("recipes/paper/infopro/resnet110_cifar10_k16.toml", []),
])
def test_costs_from_shapes_equal_the_measured_bytes_on_the_paper_recipes(registries, path, overrides):
    """Fake tensors see what real arithmetic saves: the paper's CIFAR ResNet-32/110 recipes with
    context selectors and InfoPro's decoders, every piece equal to the real count."""
    from contsup.config.recipe import load_recipe

    recipe = load_recipe(REPO / path, ["data.batch_size=2", *overrides], registries)
    model = assert_shapes_equal_saved(recipe)
    assert len(model._heads) >= 4 and (overrides == [] or len(model._adapters) >= 3)


def test_costs_from_shapes_equal_the_measured_bytes_for_a_timm_resnet50(registries):
    from contsup.config.recipe import loads_recipe

    from test_backbones import IMAGENET_RECIPE

    text = IMAGENET_RECIPE.format(size=32, model="resnet50", partition="uniform", k=4, measure="", context="R1E", encoder='encoder = "fast"')
    assert_shapes_equal_saved(loads_recipe(text, registries, source="imagenet.toml"))


class ValueBranch(nn.Module):
    """A unit that branches on its input's values: fake tensors cannot run it."""

    def __init__(self, unit):
        super().__init__()
        self.unit = unit

    def forward(self, h):
        return self.unit(h) if h.sum() > -1e30 else self.unit(h) * 2


def test_a_piece_fake_tensors_cannot_run_is_measured_for_real_with_a_note(small_recipe):
    recipe = small_recipe(modules=4, context="R1E", batch_size=4)
    parts, shapes, info = recipe_parts(recipe)
    parts = attrs.evolve(parts, units=[parts.units[0], ValueBranch(parts.units[1]), *parts.units[2:]])
    shapes_model = CostModel(recipe, parts, shapes, info, method="shapes")
    saved_model = CostModel(recipe, parts, shapes, info, method="saved")
    assert shapes_model.units == saved_model.units
    assert len(shapes_model.notes) == 1 and shapes_model.notes[0].startswith("unit 1: measured with real arithmetic")
    bound = CostModel(recipe, parts, shapes, info, method="shapes", real_fallback=False)  # what a fit estimate uses
    assert bound.units[1].own == 0 and bound.units[1].params == saved_model.units[1].params
    assert bound.units[:1] + bound.units[2:] == saved_model.units[:1] + saved_model.units[2:]
    assert bound.notes[0].startswith("unit 1: counted as keeping nothing (a lower bound)")
    with pytest.raises(ValueError, match="timing needs real arithmetic"):
        CostModel(recipe, parts, shapes, info, method="shapes", timing=True)


def test_costs_from_shapes_allocate_nothing_of_the_batch(small_recipe, registries):
    """Fake parts and a fake batch: a network whose activations would need 250 GB is costed
    without allocating them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    recipe = small_recipe(modules=4, context="R1E", batch_size=4)
    recipe = attrs.evolve(recipe, data=attrs.evolve(recipe.data, batch_size=2**20))
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    parts, shapes, info = recipe_parts(recipe, fake)
    model = CostModel(recipe, parts, shapes, info, fake_mode=fake)
    assert model.peak(even_split(model.n, 4)) > 2**37

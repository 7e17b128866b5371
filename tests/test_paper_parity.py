"""Paper parity (issue 14): the paper recipes build what the official code built, the network that
produced the published numbers: its adapters, module 2's sources, its initialisation of every
convolution and its schedule. The paper's text stays one preset away (``preset = "paper"``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from contsup.config.optim import OfficialCosine, lr_scheduler
from contsup.config.recipe import load_recipe, loads_recipe
from contsup.errors import RecipeError
from contsup.model.network import build_network

from conftest import ROOT, small_recipe_text

PAPER = ROOT / "recipes" / "paper"
R32_K16_R1E = ["partition.modules=16", "context.use=R1E"]

# backbone + auxiliary head + adapters of each module of the official ResNet-32 K=16 R1E model
OFFICIAL_COUNTS = [10_650, 16_966, *[17_254] * 4, 45_094, 51_174, *[51_686] * 3, 109_286, 130_150, 132_198, 132_198, 86_246]


def _bias_free_count(module: nn.Module) -> int:
    """Parameters, leaving out the biases of convolutions followed by batch norm (they do nothing)."""
    total = sum(p.numel() for p in module.parameters())
    previous = None
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d) and isinstance(previous, nn.Conv2d) and previous.bias is not None:
            total -= previous.bias.numel()
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            previous = m
    return total


def test_resnet32_k16_r1e_has_the_official_parameter_counts(registries):
    recipe = load_recipe(PAPER / "resnet32_cifar10.toml", R32_K16_R1E, registries)
    built = build_network(recipe)
    assert [_bias_free_count(m) for m in built.network.blocks] == OFFICIAL_COUNTS


def test_the_paper_text_variant_is_the_larger_network_of_the_issue(registries):
    recipe = load_recipe(PAPER / "resnet32_cifar10.toml", [*R32_K16_R1E, "preset=paper"], registries)
    network = build_network(recipe).network
    assert sum(p.numel() for p in network.parameters()) == 1_098_784
    assert recipe.run.init == "default" and recipe.schedule.use == "cosine"


def test_module_2_gets_x_only_under_the_official_preset(registries):
    official = build_network(load_recipe(PAPER / "resnet32_cifar10.toml", R32_K16_R1E, registries))
    paper = build_network(load_recipe(PAPER / "resnet32_cifar10.toml", [*R32_K16_R1E, "preset=paper"], registries))
    assert [str(s) for s in official.plans[1].sources] == ["x"]
    assert [str(s) for s in paper.plans[1].sources] == ["x", "h0"]  # as before: h_0^c = x through M_R as well
    for later in range(2, 16):  # the other modules are the same
        assert official.plans[later].sources == paper.plans[later].sources


def _spread_problems(network: nn.Module) -> list[str]:
    """Convolutions whose weights do not look drawn from normal(0, sqrt(2 / (k*k*out))): a sample
    std off by more than 5 standard errors (1/sqrt(2N) relative), or a mean off by 5."""
    bad = []
    for name, m in network.named_modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight.detach().flatten().double()
            n = w.numel()
            expected = math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels))
            std = w.pow(2).mean().sqrt().item()  # about the known mean 0
            if abs(std / expected - 1) > 5 / math.sqrt(2 * n) or abs(w.mean().item()) > 5 * expected / math.sqrt(n):
                bad.append(f"{name}: std {std:.4f}, expected {expected:.4f} ({n} weights)")
    return bad


def test_every_convolution_has_the_official_spread(registries):
    torch.manual_seed(0)
    recipe = load_recipe(PAPER / "resnet32_cifar10.toml", [*R32_K16_R1E, "run.seed=0"], registries)
    network = build_network(recipe).network
    convs = [n for n, m in network.named_modules() if isinstance(m, nn.Conv2d)]
    assert any(".head." in n for n in convs) and any(".adapters." in n for n in convs)
    assert _spread_problems(network) == []
    for m in network.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_the_spread_test_fails_on_pytorchs_default_initialisation(registries):
    torch.manual_seed(0)
    recipe = load_recipe(PAPER / "resnet32_cifar10.toml", [*R32_K16_R1E, "run.init=default"], registries)
    bad = _spread_problems(build_network(recipe).network)
    assert bad and all(".head." in line or ".adapters." in line for line in bad)  # the backbone has it already


def test_decoders_are_initialised_too(registries):
    torch.manual_seed(0)
    recipe = load_recipe(PAPER / "infopro" / "resnet32_cifar10_k4.toml", ["context.use=R1E"], registries)
    network = build_network(recipe).network
    assert any(".decoder." in n for n, _ in network.named_modules()) and _spread_problems(network) == []


@pytest.mark.parametrize(
    "epoch, lr",
    [(1, 0.01), (5, 0.3252295562675515), (10, 0.714082700945163), (11, 0.790706352528349), (80, 0.4), (160, 0.0)],
)
def test_the_official_schedule_at_the_epochs_that_tell(epoch, lr):
    schedule = OfficialCosine(OfficialCosine.Options())
    assert schedule.lr(epoch, 160, 0.8) == pytest.approx(lr, abs=1e-12)
    # the formula spelled out: the cosine over all 160 epochs, blended from 0.01 over the first 10
    cosine = 0.4 * (1 + math.cos(math.pi * epoch / 160))
    assert lr == pytest.approx(cosine * (epoch - 1) / 10 + 0.01 * (11 - epoch) / 10 if epoch <= 10 else cosine)


def test_the_official_schedule_is_set_per_epoch_on_the_optimizer():
    schedule = OfficialCosine(OfficialCosine.Options())
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.8)
    steps_per_epoch = 3
    scheduler = lr_scheduler(optimizer, schedule, 160 * steps_per_epoch, steps_per_epoch)
    seen = {}
    for step in range(160 * steps_per_epoch):
        seen.setdefault(step // steps_per_epoch + 1, set()).add(round(optimizer.param_groups[0]["lr"], 12))
        optimizer.step()
        scheduler.step()
    assert all(len(v) == 1 for v in seen.values())  # constant within an epoch
    for epoch in (1, 5, 10, 11, 80, 160):
        assert seen[epoch] == {round(schedule.lr(epoch, 160, 0.8), 12)}


def test_the_built_in_selectors_default_to_the_official_adapters(registries):
    from contsup.adapters import InputEncoder, OfficialShortcutAdapter

    recipe = loads_recipe(small_recipe_text(context="R2E"), registries)
    assert recipe.context.options.encoder == "official" and recipe.context.options.shortcut == "official"
    assert recipe.context.options.input_once is False and recipe.run.init == "default"  # those only by preset
    network = build_network(recipe).network
    encoders = [a for m in network.blocks for a in m.adapters.values() if isinstance(a, InputEncoder)]
    assert encoders and all(e.conv1.out_channels == 12 for e in encoders)
    assert any(isinstance(a, OfficialShortcutAdapter) for m in network.blocks for a in m.adapters.values())


def test_a_preset_fills_in_only_what_the_recipe_leaves_out(registries):
    text = small_recipe_text(context="R1E", extra='[schedule]\nuse = "cosine"\nwarmup_epochs = 2\n')
    recipe = loads_recipe('preset = "official"\n' + text.replace('use = "R1E"', 'use = "R1E"\nencoder = "paper"'), registries)
    assert recipe.context.options.encoder == "paper"  # the recipe's own key wins
    assert recipe.context.options.shortcut == "official" and recipe.context.options.input_once is True
    assert recipe.schedule.use == "cosine" and recipe.schedule.options.warmup_epochs == 2  # another schedule: none of the preset's keys
    assert recipe.run.init == "official"
    assert "preset" not in recipe.table() and recipe.table()["context"]["input_once"] is True  # resolved: spelled out
    with pytest.raises(RecipeError) as err:
        loads_recipe('preset = "oficial"\n' + text, registries, source="p.toml")
    assert err.value.problems == ("p.toml: preset: unknown preset 'oficial'; did you mean 'official'? choices: official, paper",)


PAPER_RECIPES = sorted(p for p in PAPER.rglob("*.toml") if not p.name.endswith(".sweep.toml"))


@pytest.mark.parametrize("path", PAPER_RECIPES, ids=lambda p: str(p.relative_to(PAPER)))
def test_every_paper_recipe_is_the_official_setting(path, registries):
    recipe = load_recipe(path, registries=registries)
    o = recipe.context.options
    assert (o.encoder, o.shortcut, o.input_once, recipe.run.init) == ("official", "official", True, "official")
    assert recipe.schedule.use == "official_cosine" and recipe.schedule.options == OfficialCosine.Options()


def test_table3s_contsup_runs_all_plan_with_a_decoder_on_modules_1_to_k_minus_1(registries):
    from contsup.config.reading import load_with_extends, set_path
    from contsup.config.validation import build_recipe
    from contsup.tools.sweep import load_sweep

    sweep = load_sweep(PAPER / "table3.sweep.toml")
    seen = set()
    for run in sweep.runs():
        settings = dict(run.settings)
        if settings.get("run.seed", 0) != 0 or settings.get("objective.use") != "cross_entropy":
            continue  # the seeds and the objective do not change the plan
        data = load_with_extends(run.recipe)
        for key, value in run.settings:
            set_path(data, key.split("."), value)
        recipe = build_recipe(data, str(run.recipe), registries)
        assert recipe.context.use == "R1E" and recipe.decoder is not None and recipe.decoder.use == "infopro"
        k = recipe.partition.modules
        assert recipe.decoder.create().weights(1, k)[0] > 0  # module 1 reconstructs in every InfoPro table
        seen.add((recipe.dataset.use, k))
        if recipe.dataset.use != "cifar10":
            continue  # one dataset's networks are built (ResNet-110 at 96x96 is slow); the plan is the same
        network = build_network(recipe).network
        assert [m.decoder is not None for m in network.blocks] == [True] * (k - 1) + [False], run.recipe
    assert seen == {(d, k) for d in ("cifar10", "svhn", "stl10") for k in (2, 4, 8, 16)}
    assert len(list(sweep.runs())) == 12 * 2 * 5


def test_results_show_the_final_or_the_best_test_error_and_say_which(tmp_path, capsys):
    import csv

    from contsup.cli import main
    from test_results import fake_run, paper_table

    fake_run(tmp_path, "a", paper_table("R1E", dataset="digits"), [9.0, 4.0, 6.0])
    fake_run(tmp_path, "b", paper_table("R1E", dataset="digits"), [8.0, 2.0, 4.0])
    csv_path = tmp_path / "t.csv"
    assert main(["results", str(tmp_path), "--csv", str(csv_path)]) == 0
    out, err = capsys.readouterr()
    assert "| final test error % |" in out and "| 5.00 ± 1.41 |" in out and "last epoch" in err
    assert main(["results", str(tmp_path), "--error", "best"]) == 0
    out, err = capsys.readouterr()
    assert "| best test error % |" in out and "| 3.00 ± 1.41 |" in out and "lowest over its epochs" in err
    (row,) = csv.DictReader(csv_path.open())
    assert float(row["test_error_mean"]) == 5.0 and float(row["best_test_error_mean"]) == 3.0


# The official code's partition tables (cut after [stage, block]; /work/shared/paper/results.md)
EQUAL_TABLES = {
    ("cifar_resnet32", 2): [[2, 1]],
    ("cifar_resnet32", 4): [[1, 2], [2, 1], [3, 0]],
    ("cifar_resnet32", 8): [[1, 0], [1, 2], [1, 4], [2, 1], [2, 3], [3, 0], [3, 2]],
    ("cifar_resnet110", 4): [[1, 11], [2, 7], [3, 3]],
    ("cifar_resnet110", 8): [[1, 4], [1, 11], [2, 0], [2, 7], [2, 14], [3, 3], [3, 10]],
}


@pytest.mark.parametrize("backbone, k", list(EQUAL_TABLES), ids=lambda v: str(v))
def test_the_official_equal_tables_are_the_uniform_split(backbone, k):
    from contsup_partition import Cuts, uniform_split

    units = 16 if backbone == "cifar_resnet32" else 55
    costs = _costs(units)
    cuts = Cuts(Cuts.Options(after=tuple(tuple(c) for c in EQUAL_TABLES[backbone, k])))
    assert cuts.split(costs, k) == uniform_split(units, k)


def _costs(units):
    from contsup.types import Costs

    return Costs(units=(1.0,) * units, overhead=tuple((0.0,) * (units - i) for i in range(units)))


def test_k16_cuts_after_every_unit_and_sizes_work_too():
    from contsup_partition import Cuts

    every = tuple([(0, 0)] + [(s, b) for s in (1, 2, 3) for b in range(5)][:-1])
    assert Cuts(Cuts.Options(after=every)).split(_costs(16), 16) == (1,) * 16
    assert Cuts(Cuts.Options(sizes=(16, 39))).split(_costs(55), 2) == (16, 39)


@pytest.mark.parametrize(
    "name, sizes",
    [
        ("resnet110_cifar10_k2_official_cuts.toml", [16, 39]),
        ("resnet110_cifar10_k3_official_cuts.toml", [11, 11, 33]),
        ("resnet110_cifar10_k4_official_cuts.toml", [8, 8, 12, 27]),
        ("resnet32_cifar10_k2_official_cuts.toml", [5, 11]),
        ("resnet32_cifar10_k4_official_cuts.toml", [4, 2, 3, 7]),
    ],
)
def test_the_figure_4_recipes_cut_where_the_official_tables_do(name, sizes, registries):
    recipe = load_recipe(PAPER / "figure4" / name, registries=registries)
    built = build_network(recipe)
    assert [p.units for p in built.plans] == sizes


def test_bad_cut_points_are_one_line_each(registries):
    text = small_recipe_text(modules=3, extra="")
    bad = text.replace("[partition]\n", '[partition]\nuse = "cuts"\nafter = [[0, 2]]\nsizes = [1, 2]\n')
    with pytest.raises(RecipeError) as err:
        loads_recipe(bad, registries, source="c.toml")
    assert err.value.problems == (
        "c.toml: partition.after: [0, 2] is not a cut point: use [0, 0] (after the stem) or [stage >= 1, block >= 0]",
    )
    from contsup.errors import ContsupError

    wrong_k = loads_recipe(text.replace("[partition]\n", '[partition]\nuse = "cuts"\nafter = [[1, 1]]\n'), registries)
    with pytest.raises(ContsupError, match="1 cut points make 2 modules, but partition.modules = 3"):
        build_network(wrong_k)

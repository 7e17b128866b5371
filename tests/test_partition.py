"""The uniform partitioner: K non-empty contiguous modules, sizes differ by at most one,
earlier modules never larger than later ones; the paper's ResNet-110 and ResNet-32 cuts.
memory_balanced: optimal, earliest among optima, never above uniform. Both keep the contract
contsup.testing.check_partitioner holds every partitioner to; the hypothesis strategies are the
ones plugin authors get (contsup.testing.strategies)."""

from __future__ import annotations

import pytest
from hypothesis import given

from contsup.testing import check_partitioner
from contsup.testing.strategies import costs_and_k
from contsup.types import Costs
from contsup_partition import Cuts, Uniform, uniform_split


@given(costs_and_k(max_units=200, measured=False, flops=False))
def test_uniform_split_invariants(ck):
    costs, k = ck
    n = costs.n
    sizes = Uniform(Uniform.Options()).split(costs, k)
    assert len(sizes) == k and sum(sizes) == n and min(sizes) >= 1
    assert max(sizes) - min(sizes) <= 1
    assert list(sizes) == sorted(sizes)  # never larger earlier than later


@pytest.mark.parametrize(
    "n, k, expected",
    [
        (55, 2, (27, 28)),
        (55, 4, (13, 14, 14, 14)),
        (55, 16, (3,) * 9 + (4,) * 7),
        (16, 16, (1,) * 16),
        (16, 2, (8, 8)),
        (16, 4, (4, 4, 4, 4)),
        (16, 8, (2,) * 8),
    ],
)
def test_paper_cuts(n, k, expected):
    assert uniform_split(n, k) == expected


@pytest.mark.parametrize("n, k", [(3, 4), (5, 0)])
def test_impossible_cuts_are_refused(n, k):
    with pytest.raises(ValueError):
        uniform_split(n, k)


# -- memory_balanced ------------------------------------------------------------------------

from itertools import combinations  # noqa: E402

from hypothesis import settings  # noqa: E402

from contsup_partition import MemoryBalanced, min_max_split, split_peak  # noqa: E402


def all_splits(n: int, k: int):
    """Every split of n units into k non-empty contiguous modules, in lexicographic order of sizes."""
    for cuts in combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        yield tuple(b - a for a, b in zip(bounds, bounds[1:]))


@settings(max_examples=300, deadline=None)
@given(costs_and_k())
def test_memory_balanced_is_optimal_contiguous_and_earliest(ck):
    costs, k = ck
    n = len(costs.units)
    sizes = MemoryBalanced(MemoryBalanced.Options()).split(costs, k)
    assert len(sizes) == k and sum(sizes) == n and min(sizes) >= 1  # contiguous, covers every unit
    peaks = {s: split_peak(costs, s) for s in all_splits(n, k)}
    best = min(peaks.values())
    assert split_peak(costs, sizes) == best
    # ties go to the earliest cuts: the lexicographically smallest optimal sizes
    assert sizes == min(s for s, p in peaks.items() if p == best)


@settings(max_examples=200, deadline=None)
@given(costs_and_k())
def test_memory_balanced_never_exceeds_uniform(ck):
    costs, k = ck
    sizes = min_max_split(costs, k)
    assert split_peak(costs, sizes) <= split_peak(costs, uniform_split(len(costs.units), k))


@settings(max_examples=200, deadline=None)
@given(costs_and_k(overhead=False))
def test_memory_balanced_peak_never_increases_with_k(ck):
    # for costs that are sums of unit costs; with a per-module overhead an extra module brings its
    # own head and adapters, and the best peak can grow with K
    costs, _ = ck
    n = len(costs.units)
    peaks = [split_peak(costs, min_max_split(costs, k)) for k in range(1, n + 1)]
    assert all(a >= b for a, b in zip(peaks, peaks[1:]))


def test_ties_break_toward_the_earliest_cut():
    # four equal units in two modules: (2, 2) is the only optimum
    assert min_max_split(Costs((1.0, 1.0, 1.0, 1.0)), 2) == (2, 2)
    # peak 5 is reached by (1, 2), (2, 1): the earlier cut wins
    assert min_max_split(Costs((5.0, 0.0, 5.0)), 2) == (1, 2)
    # every split of zero costs ties: the first modules are as short as possible
    assert min_max_split(Costs((0.0,) * 5), 3) == (1, 1, 3)


def test_overhead_moves_the_cut():
    # units alone would cut (2, 2); a heavy overhead on modules starting at units 1 and 2 pushes
    # the cut to the last place where it is cheap
    units = (1.0, 1.0, 1.0, 1.0)
    overhead = tuple(tuple(10.0 if i in (1, 2) else 0.0 for _ in range(4 - i)) for i in range(4))
    assert min_max_split(Costs(units), 2) == (2, 2)
    assert min_max_split(Costs(units, overhead), 2) == (3, 1)


def test_impossible_memory_balanced_cuts_are_refused():
    with pytest.raises(ValueError):
        min_max_split(Costs((1.0, 1.0)), 3)


def test_memory_balanced_measured_at_a_small_batch_finds_the_same_split(registries):
    """partition.measure_batch: saved activations grow in proportion to the batch, so costs
    measured at batch 4 give the split measured at the recipe's batch 32 (what lets the ImageNet
    recipes plan on a CPU in seconds)."""
    import torch

    from conftest import small_recipe_text
    from contsup.config.recipe import loads_recipe
    from contsup.model.network import build_network

    splits = []
    for measure in (0, 4):
        text = small_recipe_text(batch_size=32, modules=4).replace(
            "[partition]\n", f'[partition]\nuse = "memory_balanced"\nmeasure_batch = {measure}\n'
        )
        recipe = loads_recipe(text, registries, source="small.toml")
        assert recipe.partitioner.create().cost_batch_size == (measure or None)
        torch.manual_seed(0)
        splits.append(tuple(p.units for p in build_network(recipe).plans))
    assert splits[0] == splits[1] != (2, 2, 3, 3)  # measured, not uniform's split


# -- the contract every partitioner keeps (contsup.testing.check_partitioner) ---------------------


@pytest.mark.parametrize("partitioner", [Uniform, MemoryBalanced], ids=["uniform", "memory_balanced"])
def test_builtin_partitioners_keep_the_contract(partitioner):
    check_partitioner(partitioner)


def test_memory_balanced_says_what_it_balances_and_uniform_does_not():
    costs = Costs((3.0, 1.0, 1.0, 1.0))
    assert MemoryBalanced(MemoryBalanced.Options()).balances(costs) is costs
    assert not hasattr(Uniform, "balances")


@pytest.mark.parametrize(
    "options", [{"sizes": (2, 3)}, {"sizes": (1, 1, 1, 1)}, {"after": ((0, 0), (1, 1))}, {"after": ((1, 0),), "stages": 2}],
)
def test_cuts_keep_the_contract_and_refuse_other_networks_in_one_line(options):
    """Cuts serves only the networks its option fits; every other table is refused with a ContsupError."""
    check_partitioner(Cuts(Cuts.Options(**options)))


@settings(max_examples=100, deadline=None)
@given(costs_and_k(flops=True))
def test_the_engine_facts_do_not_change_memory_balanced(ck):
    """FLOPs, shapes and the batch ride along; the split is that of the units and overhead alone."""
    costs, k = ck
    bare = Costs(costs.units, costs.overhead)
    assert min_max_split(costs, k) == min_max_split(bare, k)


# -- what the engine gives a partitioner ------------------------------------------------------------


class Recorder:
    """Records the tables it is given; splits as memory_balanced does."""

    name = "recorder"

    def __init__(self, options=None):
        self.seen = []

    def split(self, costs, k):
        self.seen.append(costs)
        return min_max_split(costs, k)


@pytest.mark.parametrize("needs_costs", [False, True])
@pytest.mark.parametrize("needs_flops", [False, True])
def test_a_partitioner_gets_shapes_always_and_measurements_when_it_asks(registries, needs_costs, needs_flops):
    from conftest import small_recipe_text
    from contsup.config.recipe import loads_recipe
    from contsup.model.build import recipe_parts
    from contsup.model.fitting import partition_costs
    from contsup.model.flops import unit_flops

    recipe = loads_recipe(small_recipe_text(batch_size=16, modules=3), registries, source="small.toml")
    parts, shapes, info = recipe_parts(recipe)
    partitioner = Recorder()
    partitioner.needs_costs, partitioner.needs_flops = needs_costs, needs_flops
    given = partition_costs(partitioner, recipe, parts, shapes, info)
    sizes = partitioner.split(given, 3)
    assert partitioner.seen and all(c.unit_shapes == tuple(shapes) for c in partitioner.seen)
    for costs in partitioner.seen:
        assert costs.input_shape == info.input_shape and costs.n == len(shapes)
        assert costs.measured is needs_costs and costs.batch_size == (16 if needs_costs else None)
        assert (costs.units == (1.0,) * costs.n) is not needs_costs and (costs.overhead is None) is not needs_costs
        assert costs.flops == (unit_flops(parts.units, info.input_shape) if needs_flops else None)
    assert given.layout(sizes).module(1).input_shape == info.input_shape
    if needs_costs:  # the memory split is the one memory_balanced makes: the facts change nothing
        from contsup.model.network import build_network

        text = small_recipe_text(batch_size=16, modules=3).replace("[partition]\n", '[partition]\nuse = "memory_balanced"\n')
        assert tuple(p.units for p in build_network(loads_recipe(text, registries, source="small.toml")).plans) == sizes

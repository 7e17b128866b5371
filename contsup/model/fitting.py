"""Fitting a split to its costs: the ``Costs`` table a partitioner is given, exact for the split
it yields (:func:`fitted_costs`), and what ``build_network`` passes to the recipe's partitioner
(:func:`partition_costs`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import attrs
from torch._subclasses.fake_tensor import FakeTensorMode

from contsup.config.recipe import Recipe
from contsup.model.costs import CostModel, even_split
from contsup.model.flops import unit_flops
from contsup.types import Costs, DatasetInfo, Shape


def fitted_costs(model: CostModel, split: Callable[[Costs, int], Sequence[int]], k: int, rounds: int = 8) -> Costs:
    """A ``Costs`` table that is exact for the split ``split`` makes of it.

    The table's overhead assumes where earlier modules start (:meth:`CostModel.costs`); starting
    from the even split, it is rebuilt around the split it yields until the two agree (a fixed
    point, usually in one or two rounds). Without agreement after ``rounds``, the table whose
    split has the smallest true peak is returned.
    """
    like = even_split(model.n, k)
    tried: set[tuple[int, ...]] = set()
    seen: list[tuple[int, Costs]] = []
    for _ in range(rounds):
        tried.add(like)
        costs = model.costs(k, like)
        sizes = tuple(int(s) for s in split(costs, k))
        if sizes == like:
            return costs
        seen.append((model.peak(sizes), costs))
        if sizes in tried:  # a cycle: no table agrees with its own split
            break
        like = sizes
    return min(seen, key=lambda pc: pc[0])[1]


def partition_costs(
    partitioner: Any, recipe: Recipe, parts: Any, shapes: Sequence[Shape], info: DatasetInfo, fake_mode: FakeTensorMode | None = None,
) -> Costs:
    """What ``partitioner.split`` is given: the network's shapes always (free), each unit's
    forward FLOPs per image when it asks (``needs_flops = True``), and measured saved-tensor
    costs at the recipe's batch size when it asks (``needs_costs = True``), else a placeholder
    of 1.0 per unit marked ``measured = False``.

    Measured at the partitioner's ``cost_batch_size`` when it has one (saved activations grow in
    proportion to the batch). Counted from shapes (fake tensors, no arithmetic) with the
    deterministic saved-tensor count, which is the CPU's to the byte, so a split (and with it the
    network's structure) is the same on every machine and a trained model always reloads.
    ``fake_mode``: the one ``parts`` were built in, when they are fake (:func:`recipe_parts`);
    a piece fake tensors cannot run then counts as keeping nothing (a lower bound) rather than
    being measured for real.
    """
    facts: dict[str, Any] = {"input_shape": tuple(info.input_shape), "unit_shapes": tuple(tuple(s) for s in shapes)}
    if getattr(partitioner, "needs_flops", False):
        facts["flops"] = unit_flops(list(parts.units), tuple(info.input_shape), fake_mode)
    if not getattr(partitioner, "needs_costs", False):
        return attrs.evolve(Costs.uniform(len(shapes)), **facts)
    batch = getattr(partitioner, "cost_batch_size", None)  # None: the recipe's batch
    model = CostModel(
        recipe, parts, shapes, info, device="cpu", method="shapes", batch_size=batch, fake_mode=fake_mode, real_fallback=fake_mode is None,
    )
    facts["batch_size"] = model.batch

    def split(costs: Costs, k: int) -> Sequence[int]:  # the partitioner sees every round's table with the facts
        return partitioner.split(attrs.evolve(costs, **facts), k)

    return attrs.evolve(fitted_costs(model, split, recipe.partition.modules), **facts)


__all__ = ["fitted_costs", "partition_costs"]

"""Built-in partitioners: how a backbone's minimal units are cut into K modules."""

from __future__ import annotations

import attrs

from contsup import ContsupError, hookimpl
from contsup.options import at_least, option
from contsup.partition import even_split as uniform_split, min_max_split, split_peak
from contsup.types import Costs


class Uniform:
    """Equal numbers of units per module, as in the paper's experiments."""

    name = "uniform"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options: "Uniform.Options") -> None:
        self.options = options

    def split(self, costs: Costs, k: int) -> tuple[int, ...]:
        return uniform_split(len(costs.units), k)


class MemoryBalanced:
    """The exact contiguous split minimising the largest module's measured training memory."""

    name = "memory_balanced"
    needs_costs = True  # build_network measures per-unit costs (contsup.model.fitting) before split()

    @attrs.frozen
    class Options:
        measure_batch: int = option(
            0, doc="batch size the per-unit costs are counted at (0: data.batch_size); they are counted from shapes, "
            "so any batch is quick, and saved activations grow in proportion to the batch, so a small one gives the same split",
            validator=at_least(0),
        )

    def __init__(self, options: "MemoryBalanced.Options") -> None:
        self.options = options

    @property
    def cost_batch_size(self) -> int | None:
        """The batch the engine measures costs at (None: the recipe's)."""
        return self.options.measure_batch or None

    def split(self, costs: Costs, k: int) -> tuple[int, ...]:
        return min_max_split(costs, k)

    def balances(self, costs: Costs) -> Costs:
        """What the split balances (contsup.testing.check_partitioner holds it to the promise):
        the measured memory itself."""
        return costs


def _cut_points(value: tuple[tuple[int, int], ...]) -> None:
    for stage, block in value:
        if stage < 0 or block < 0 or (stage == 0 and block != 0):
            raise ValueError(
                f"[{stage}, {block}] is not a cut point: use [0, 0] (after the stem) or [stage >= 1, block >= 0]"
            )


def cuts_to_sizes(after: tuple[tuple[int, int], ...], units: int, stages: int) -> tuple[int, ...]:
    """Unit counts for cuts after [stage, block] (stage 0 block 0 = after the stem; stages 1..S of
    equal length, blocks 0-based) in a backbone of ``units`` units: the stem, then S stages."""
    if (units - 1) % stages:
        raise ContsupError(
            f"partition.after: the backbone's {units - 1} blocks after the stem do not make {stages} equal stages "
            f"(partition.stages); give unit counts in partition.sizes instead"
        )
    per_stage = (units - 1) // stages
    ends = []
    for stage, block in after:
        if stage > stages or block >= per_stage:
            raise ContsupError(
                f"partition.after: [{stage}, {block}] is past the backbone's {stages} stages of {per_stage} blocks"
            )
        ends.append(0 if stage == 0 else 1 + (stage - 1) * per_stage + block)  # 0-based unit index, cut after it
    if sorted(set(ends)) != ends:
        raise ContsupError(f"partition.after: {[list(a) for a in after]} is not in increasing order without repeats")
    bounds = [0, *(e + 1 for e in ends), units]
    if bounds[-2] >= units:
        raise ContsupError(f"partition.after: {list(after[-1])} cuts after the last unit; the last module would be empty")
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


class Cuts:
    """Explicit cut points: the split written out, e.g. a hand-made memory-balanced table."""

    name = "cuts"

    @attrs.frozen
    class Options:
        after: tuple[tuple[int, int], ...] = option(
            (), doc="cut after these [stage, block] points, K-1 of them in order ([0, 0]: after the stem; stages "
            "from 1, blocks from 0), as the official code's tables write them",
            validator=lambda _i, _a, value: _cut_points(value),
        )
        sizes: tuple[int, ...] = option(
            (), doc="or: the K unit counts themselves (the stem is unit 1), e.g. [16, 39]",
            validator=lambda _i, _a, value: _positive(value),
        )
        stages: int = option(3, doc="equal stages after the stem, for reading after (3 for CIFAR ResNets)", validator=at_least(1))

        def __attrs_post_init__(self) -> None:
            if bool(self.after) == bool(self.sizes):
                raise ValueError("after, sizes: give exactly one of them (cut points or unit counts)")

    def __init__(self, options: "Cuts.Options") -> None:
        self.options = options

    def split(self, costs: Costs, k: int) -> tuple[int, ...]:
        o = self.options
        n = len(costs.units)
        sizes = tuple(o.sizes) if o.sizes else cuts_to_sizes(o.after, n, o.stages)
        if len(sizes) != k:
            given = f"{len(o.after)} cut points" if o.after else f"{len(sizes)} unit counts"
            raise ContsupError(f"partition: {given} make {len(sizes)} modules, but partition.modules = {k}")
        if sum(sizes) != n:
            raise ContsupError(f"partition.sizes: {list(sizes)} sums to {sum(sizes)}, the backbone has {n} units")
        return sizes


def _positive(value: tuple[int, ...]) -> None:
    if any(v < 1 for v in value):
        raise ValueError(f"every module needs at least one unit, got {list(value)}")


@hookimpl
def register_partitioners(register):
    register(Uniform)
    register(MemoryBalanced)
    register(Cuts)


__all__ = ["Uniform", "MemoryBalanced", "Cuts", "cuts_to_sizes", "uniform_split", "min_max_split", "split_peak"]

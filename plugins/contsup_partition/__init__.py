"""Built-in partitioners: how a backbone's minimal units are cut into K modules."""

from __future__ import annotations

import attrs

from contsup import hookimpl
from contsup.options import at_least, option
from contsup.partition import min_max_split, split_peak
from contsup.types import Costs


def uniform_split(n: int, k: int) -> tuple[int, ...]:
    """K unit counts as equal as possible, the earlier modules one fewer when K does not divide n
    (55 units, K=4 -> 13, 14, 14, 14)."""
    if not 1 <= k <= n:
        raise ValueError(f"cannot cut {n} units into {k} non-empty modules")
    base, extra = divmod(n, k)
    return tuple(base + (1 if i >= k - extra else 0) for i in range(k))


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
    needs_costs = True  # build_network measures per-unit costs (contsup.model.memory) before split()

    @attrs.frozen
    class Options:
        measure_batch: int = option(
            0, doc="batch size the per-unit costs are measured at, on CPU (0: data.batch_size); saved activations grow "
            "in proportion to the batch, so a small one (e.g. 8) gives the same split at ImageNet scale in seconds",
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


@hookimpl
def register_partitioners(register):
    register(Uniform)
    register(MemoryBalanced)


__all__ = ["Uniform", "MemoryBalanced", "uniform_split", "min_max_split", "split_peak"]

"""A contsup partitioner: the contiguous split whose largest module has the fewest forward FLOPs
per image, each resolution stage's FLOPs optionally weighted."""

from __future__ import annotations

import attrs

from contsup import ContsupError, hookimpl
from contsup.options import option
from contsup.partition import min_max_split
from contsup.types import Costs


def positive_weights(_instance, _attribute, value: tuple[float, ...]) -> None:
    """The option's validator: every weight > 0 (the message reads after the key path)."""
    if any(w <= 0 for w in value):
        raise ValueError(f"every weight must be > 0, got {list(value)}")


def weighted_flops(costs: Costs, stage_weights: tuple[float, ...] = ()) -> tuple[float, ...]:
    """Each unit's forward FLOPs per image, times the weight of its stage (none: as counted)."""
    if costs.flops is None:
        raise ContsupError("partition: flops_balanced was given no FLOPs; its class must set needs_flops = True")
    if not stage_weights:
        return costs.flops
    if len(stage_weights) != len(costs.stages):
        raise ContsupError(
            f"partition.stage_weights: {len(stage_weights)} weights for a backbone of {len(costs.stages)} "
            f"stages; give one per stage"
        )
    weight = [w for (first, last), w in zip(costs.stages, stage_weights) for _ in range(first, last + 1)]
    return tuple(f * w for f, w in zip(costs.flops, weight))


class FlopsBalanced:
    """The contiguous split whose largest module has the fewest forward FLOPs per image."""

    name = "flops_balanced"
    needs_flops = True  # contsup counts every unit's forward FLOPs before it calls split()

    @attrs.frozen
    class Options:
        stage_weights: tuple[float, ...] = option(
            (), doc="one weight per resolution stage, multiplying its FLOPs, e.g. [2.0, 1.0, 1.0] (empty: FLOPs as counted)",
            validator=positive_weights,
        )

    def __init__(self, options: "FlopsBalanced.Options") -> None:
        self.options = options

    def balances(self, costs: Costs) -> Costs:
        """The costs this split balances: the weighted FLOPs, one per unit."""
        return Costs(weighted_flops(costs, self.options.stage_weights))

    def split(self, costs: Costs, k: int) -> tuple[int, ...]:
        return min_max_split(self.balances(costs), k)


@hookimpl
def register_partitioners(register):
    register(FlopsBalanced)

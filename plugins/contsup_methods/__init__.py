"""Built-in training methods, each a recipe table of its own that the greedy step serves through
the method hooks (docs/plugins/methods.md):

- ``[backlink] units = N``: BackLink (Guo et al., 2023), module l+1's loss also trains the last N
  units of module l;
- ``[man]``: MAN (Su et al., ECCV 2024), module l's head and decoder read LB_l(h_l) + EMA_l(h_l),
  two copies of module l+1's first unit, the second a moving average of it;
- ``[hpff]``: HPFF (Su et al., ECCV 2024), module l's pair loss also trains all of module l-1, and
  an independent head of its own trains module l alone.

The networks they add live in ``contsup_methods.parts``, imported when the first is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import attrs

from contsup import hookimpl
from contsup.options import at_least, in_range, option
from contsup.types import HeadSpec

if TYPE_CHECKING:  # annotations only: torch loads when a part is built
    import torch
    from torch import nn


class BackLink:
    """BackLink (Guo et al., 2023): module l+1's loss also trains the last ``units`` units of module
    l and stops there; each of those units learns from the sum of both losses' gradients."""

    name = "backlink"
    pipeline_refusal = "module l+1's loss would cross ranks"
    plan_note = "the loss of module l+1 also trains these last units of module l"
    switch = "units"  # the key that turns it off (units = 0)

    @attrs.frozen
    class Options:
        units: int = option(
            0, doc="N: module l+1's loss back-propagates into the last N units of module l (2 <= l+1 <= K) and stops "
            "there; 0: off (plain greedy)", validator=at_least(0),
        )

    def __init__(self, options: "BackLink.Options") -> None:
        self.options = options

    def active(self) -> bool:
        return self.options.units > 0

    def link(self, module: int, num_modules: int, units: int) -> int:
        return min(self.options.units, units) if module < num_modules else 0

    def describe(self) -> int:
        return self.options.units

    def label(self) -> str:
        n = self.options.units
        return f"{n} unit{'s' if n != 1 else ''}"


class MAN:
    """MAN, the momentum auxiliary network (Su et al., ECCV 2024): module l's head and decoder read
    LB_l(h_l) + EMA_l(h_l), where LB_l is a trainable copy of module l+1's first unit and EMA_l a
    frozen one moved towards that live unit after module l's every step
    (``ema = momentum * ema + (1 - momentum) * live``)."""

    name = "man"
    pipeline_refusal = "the moving-average copy reads module l+1's first unit, which may train on another rank"

    @attrs.frozen
    class Options:
        momentum: float = option(0.995, doc="m of the moving average ema = m * ema + (1 - m) * live", validator=in_range(0.0, 1.0))
        ema_init: Literal["copy", "random"] = option(
            "copy", doc='"copy": EMA_l starts as the live unit; "random": from its own initialisation, as the official code does',
        )

    def __init__(self, options: "MAN.Options") -> None:
        self.options = options

    def active(self) -> bool:
        return True

    def part(self, spec: HeadSpec, objective: Any) -> "nn.Module | None":
        """Module l's LB_l and EMA_l (modules 1..K-1), built for module l+1's first unit."""
        if spec.module >= spec.num_modules:
            return None
        from contsup_methods.parts import MomentumCopies

        u = spec.last_unit + 1
        return MomentumCopies(spec.units[u], spec.unit_shapes[u])

    def prepare(self, network: Any) -> None:
        """With ``ema_init = "copy"``: every EMA_l starts as the live unit it follows."""
        if self.options.ema_init == "copy":
            for m, live in _followed(network):
                m.part.copy_from(live)

    def after_step(self, module: Any, network: Any) -> None:
        """EMA_l moves towards module l+1's first unit, before module l+1 steps on this batch."""
        if module.part is not None and module.index < network.num_modules:
            module.part.follow(network.blocks[module.index].body[0], self.options.momentum)

    def describe(self) -> float:
        return self.options.momentum


def _followed(network: Any) -> list[tuple[Any, Any]]:
    """(module l, module l+1's first unit) for every module with MAN's copies."""
    return [(m, network.blocks[m.index].body[0]) for m in network.blocks if m.part is not None]


class HPFF:
    """HPFF (Su et al., ECCV 2024): module l's usual loss (its head and decoder, the pair loss)
    also trains all of module l-1's units, while an independent head of its own trains module l
    alone: loss = wy * pair + wx * independent. Module 1 learns from module 2's pair loss only."""

    name = "hpff"
    pipeline_refusal = "module l's pair loss would cross ranks into module l-1"
    plan_note = "the pair loss of module l+1 also trains all units of module l"

    @attrs.frozen
    class Options:
        wx: float = option(0.001, doc="weight of the independent head's loss (trains module l alone)", validator=in_range(0.0, 1e6))
        wy: float = option(0.999, doc="weight of the pair loss (module l's head and decoder; reaches module l-1)", validator=in_range(0.0, 1e6))

    def __init__(self, options: "HPFF.Options") -> None:
        self.options = options

    def active(self) -> bool:
        return True

    def part(self, spec: HeadSpec, objective: Any) -> "nn.Module | None":
        """Module l's independent head (modules 2..K-1), the objective's head on h_l."""
        if spec.module < 2 or spec.module >= spec.num_modules:
            return None
        from contsup_methods.parts import IndependentHead

        return IndependentHead(objective.head(spec), objective)

    def link(self, module: int, num_modules: int, units: int) -> int:
        return units if module < num_modules else 0

    def terms(self, module: int, num_modules: int, total: "torch.Tensor", extra: "torch.Tensor | None") -> tuple:
        """(linked, own): the pair loss reaches back, the independent one stays; module 1 has none."""
        wx, wy = self.options.wx, self.options.wy
        if module == 1:
            return None, None
        own = total if module == num_modules else extra
        return wy * total, (wx * own if own is not None else None)

    def describe(self) -> str:
        return f"wx {self.options.wx:g}, wy {self.options.wy:g}"


@hookimpl
def register_methods(register):
    register(BackLink)
    register(MAN)
    register(HPFF)


__all__ = ["BackLink", "MAN", "HPFF"]

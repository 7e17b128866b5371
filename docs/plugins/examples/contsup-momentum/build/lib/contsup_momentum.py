"""A contsup training method: module l's head reads h_l through two copies of module l+1's first
unit, one trained by module l's loss and one that follows the live unit as a moving average
(the momentum auxiliary network, MAN, written as a plugin)."""

from __future__ import annotations

import attrs
import torch
from torch import nn

from contsup import hookimpl
from contsup.layers import fresh_copy
from contsup.options import in_range, option
from contsup.types import HeadSpec, Shape


class NextUnitCopies(nn.Module):
    """Module l's part: ``lb``, a trainable copy of unit u (module l+1's first), and ``ema``, a
    frozen copy that follows the live u. The head reads ``lb(h) + ema(h)``, of u's output shape."""

    def __init__(self, unit: nn.Module, output_shape: Shape, learnable: bool = True) -> None:
        super().__init__()
        self.lb = fresh_copy(unit) if learnable else None
        self.ema = fresh_copy(unit)
        self.ema.requires_grad_(False)  # no gradient, so in no optimizer
        self.feature_shape = tuple(output_shape)  # what the head and decoder are built for

    def feature(self, h: torch.Tensor) -> torch.Tensor:
        """h: (B, C, H, W), module l's output -> what u would make of it: (B, *feature_shape)."""
        if self.lb is None:
            return self.ema(h)
        return self.lb(h) + self.ema(h)

    @torch.no_grad()
    def follow(self, live: nn.Module, momentum: float) -> None:
        """ema = momentum * ema + (1 - momentum) * live, parameter by parameter."""
        for e, p in zip(self.ema.parameters(), live.parameters()):
            e.copy_(e * momentum + p * (1 - momentum))

    @torch.no_grad()
    def copy_from(self, live: nn.Module) -> None:
        """The moving-average copy takes the live unit's values."""
        for e, p in zip(self.ema.parameters(), live.parameters()):
            e.copy_(p)


def next_unit(network: nn.Module, module: nn.Module) -> nn.Module:
    """Module l+1's first unit, the live one, looked up when needed (module l is 1-based
    ``module.index``, ``network.blocks`` is 0-based: ``blocks[l]`` is module l+1)."""
    return network.blocks[module.index].body[0]


class MomentumAux:
    """Module l's head reads copies of module l+1's first unit: one trained by module l's loss, one
    moving towards the live unit after each of module l's steps (MAN, Su et al., ECCV 2024)."""

    name = "momentum_aux"
    pipeline_refusal = "the moving-average copy reads module l+1's first unit, which may train on another rank"

    @attrs.frozen
    class Options:
        momentum: float = option(0.995, doc="m in ema = m * ema + (1 - m) * live, after every step", validator=in_range(0.0, 1.0))
        learnable: bool = option(True, doc="also a trainable copy of the unit (false: the moving-average copy alone)")

    def __init__(self, options: "MomentumAux.Options") -> None:
        self.options = options

    def active(self) -> bool:
        return True

    def part(self, spec: HeadSpec, objective: object) -> nn.Module:
        """Module l's copies of unit u = module l+1's first (spec.units are the network's own
        units: copy them, never keep one)."""
        u = spec.last_unit + 1
        return NextUnitCopies(spec.units[u], spec.unit_shapes[u], self.options.learnable)

    def prepare(self, network: nn.Module) -> None:
        """Once the network is initialised: every moving-average copy starts as its live unit."""
        for module in network.blocks[:-1]:
            module.part.copy_from(next_unit(network, module))

    def after_step(self, module: nn.Module, network: nn.Module) -> None:
        """After module l's step, before module l+1's: module l's copy moves towards the live unit."""
        if module.part is not None:
            module.part.follow(next_unit(network, module), self.options.momentum)


@hookimpl
def register_methods(register):
    register(MomentumAux)

"""A contsup context selector: module l gets the input x and the features h_j^c at distances
d = 1, 2, 4, ... back (j = l-1-d >= 0), each feature through a gated shortcut adapter."""

from __future__ import annotations

import attrs
import torch
from torch import nn

from contsup import hookimpl
from contsup.options import at_least, option
from contsup.types import Shape, Source


def geometric_sources(module: int, *, base: int = 2, input: bool = True, limit: int = 0) -> tuple[Source, ...]:
    """Sources of 1-based ``module``: x (if ``input``), then h_j^c for j = module-1-d with
    d = 1, base, base^2, ... while j >= 0 (the ``limit`` nearest ones; 0 = all)."""
    if module <= 1:
        return ()  # module 1 gets no context
    features = []
    distance = 1
    while module - 1 - distance >= 0 and (limit == 0 or len(features) < limit):
        features.append(Source.feature(module - 1 - distance))
        distance *= base
    chosen = [Source.input()] if input else []
    return tuple(chosen + sorted(features, key=Source.sort_key))


class GatedShortcut(nn.Module):
    """Average pool to h's size, 1x1 conv to h's channels, BN, times a learned per-channel gate.

    h_j: (B, C_s, H_s, W_s) -> (B, C_h, H_h, W_h). With ``gate = 0`` the adapter adds nothing
    at first: the network starts as the DGL baseline and learns how much context to use.
    """

    def __init__(self, source_shape: Shape, target_shape: Shape, gate: float = 0.0) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(tuple(target_shape[1:]))
        self.conv = nn.Conv2d(source_shape[0], target_shape[0], 1, bias=False)
        self.bn = nn.BatchNorm2d(target_shape[0])
        self.gate = nn.Parameter(torch.full((1, target_shape[0], 1, 1), float(gate)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.gate * self.bn(self.conv(self.pool(h)))


class Geometric:
    """The input and the features 1, 2, 4, ... modules back: few sources, reaching far."""

    name = "geometric"

    @attrs.frozen
    class Options:
        base: int = option(2, doc="ratio of successive distances: 2 gives 1, 2, 4, 8, ...", validator=at_least(2))
        input: bool = option(True, doc="also give every module (but the first) the raw input x")
        limit: int = option(0, doc="use at most this many features, the nearest first (0: no limit)", validator=at_least(0))
        gate: float = option(0.0, doc="initial gate of each feature's adapter (0: start as the DGL baseline)")

    def __init__(self, options: "Geometric.Options") -> None:
        self.options = options

    def sources(self, module: int, num_modules: int) -> tuple[Source, ...]:
        o = self.options
        return geometric_sources(module, base=o.base, input=o.input, limit=o.limit)

    def adapter(self, source: Source, source_shape: Shape, target_shape: Shape) -> nn.Module | None:
        """A gated shortcut for a feature; None for the input, so contsup uses the paper's M_E."""
        if source.is_input:
            return None
        return GatedShortcut(source_shape, target_shape, gate=self.options.gate)


@hookimpl
def register_context_selectors(register):
    register(Geometric)

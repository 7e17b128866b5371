"""Small value types shared by the engine and the plugins."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import attrs

if TYPE_CHECKING:  # annotations only: importing torch takes seconds, and `contsup list` needs none
    from torch import nn

Shape = tuple[int, ...]


@attrs.frozen(order=True)
class Source:
    """A context source: the raw input ``x`` (``index is None``) or the feature ``h_j^c``.

    ``h_j^c`` is the context-enriched input of module j+1 (1-based modules), so ``h_0^c = x``.
    """

    index: int | None = None

    @classmethod
    def input(cls) -> "Source":
        """The raw input x, fed through an input encoder."""
        return cls(None)

    @classmethod
    def feature(cls, j: int) -> "Source":
        """The feature h_j^c, j >= 0."""
        if j < 0:
            raise ValueError(f"feature index must be >= 0, got {j}")
        return cls(j)

    @property
    def is_input(self) -> bool:
        return self.index is None

    def __str__(self) -> str:
        return "x" if self.index is None else f"h{self.index}"

    @staticmethod
    def sort_key(source: "Source") -> tuple[int, int]:
        """Input first, then features by ascending index."""
        return (0, 0) if source.index is None else (1, source.index)


@attrs.frozen
class DatasetInfo:
    """What the engine knows about a dataset without reading its files."""

    input_shape: Shape  # (C, H, W)
    num_classes: int
    mean: tuple[float, ...]  # per channel, of the normalisation applied to inputs
    std: tuple[float, ...]


@attrs.frozen
class BackboneParts:
    """A backbone cut into its minimal units (stem, then each residual block) and its head."""

    units: Sequence[nn.Module]
    head: nn.Module  # (B, C, H, W) -> (B, num_classes)


@attrs.frozen
class HeadSpec:
    """What an objective needs to build an auxiliary head for one module's output."""

    shape: Shape  # the module's output h_l: (C, H, W)
    final_shape: Shape  # the backbone's last feature: (C, H, W)
    num_classes: int


@attrs.frozen
class Costs:
    """Per-unit costs for a partitioner; ``segment(i, j)`` is the cost of one module of units
    i..j inclusive (0-based), which may add the module's own overhead to the units' sum."""

    units: tuple[float, ...]
    overhead: tuple[tuple[float, ...], ...] | None = None  # overhead[i][j], j >= i

    def segment(self, i: int, j: int) -> float:
        base = sum(self.units[i : j + 1])
        if self.overhead is not None:
            base += self.overhead[i][j - i]
        return base

    @classmethod
    def uniform(cls, n: int) -> "Costs":
        return cls(tuple(1.0 for _ in range(n)))

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
class ModuleLayout:
    """Where one module sits in the network (part of :class:`NetworkLayout`).

    ``index`` is 1-based; ``unit_range`` is [first, last] of the backbone's minimal units,
    0-based and inclusive; ``input_shape`` is h_{l-1}'s shape (x's for module 1) and so also the
    shape of h_{l-1}^c, the feature source ``Source.feature(l - 1)``; ``output_shape`` is h_l's;
    ``stage`` is the 1-based backbone stage (see ``NetworkLayout.stages``) the module's input
    comes from, 0 for module 1, whose input is x.
    """

    index: int
    unit_range: tuple[int, int]
    input_shape: Shape
    output_shape: Shape
    stage: int

    @property
    def units(self) -> int:
        return self.unit_range[1] - self.unit_range[0] + 1


@attrs.frozen
class NetworkLayout:
    """The network a context selector chooses sources for: every module's shapes and units.

    Built from the split, after the partitioner and before any source is chosen, so a selector's
    ``sources(module, num_modules, layout)`` may use it. Shapes are (C, H, W), without the batch.

    - ``input_shape``: x's shape;
    - ``unit_shapes[u]``: the output shape of the backbone's minimal unit u (0-based);
    - ``stages``: the backbone's resolution stages as [first, last] unit ranges (0-based,
      inclusive): maximal runs of consecutive units with the same output shape. For a CIFAR
      ResNet-32 on 32x32 images: (0, 5) at 16x32x32 (the stem and five blocks), (6, 10) at
      32x16x16, (11, 15) at 64x8x8;
    - ``modules``: one :class:`ModuleLayout` per module, in order; ``module(l)`` is module l's.
    """

    input_shape: Shape
    unit_shapes: tuple[Shape, ...]
    stages: tuple[tuple[int, int], ...]
    modules: tuple[ModuleLayout, ...]

    @property
    def num_modules(self) -> int:
        return len(self.modules)

    def module(self, module: int) -> ModuleLayout:
        """Module l's layout, 1-based."""
        if not 1 <= module <= len(self.modules):
            raise IndexError(f"module {module} of a {len(self.modules)}-module network; modules are 1..{len(self.modules)}")
        return self.modules[module - 1]

    def feature_shape(self, j: int) -> Shape:
        """The shape of h_j^c, the input of module j+1 (h_0^c = x)."""
        return self.module(j + 1).input_shape

    def source_shape(self, source: "Source") -> Shape:
        """The shape of a source: x's, or h_j^c's."""
        return self.input_shape if source.is_input else self.feature_shape(source.index)

    @classmethod
    def from_split(cls, input_shape: Sequence[int], unit_shapes: Sequence[Sequence[int]], sizes: Sequence[int]) -> "NetworkLayout":
        """The layout of units with output shapes ``unit_shapes`` cut into modules of ``sizes`` units."""
        input_shape = tuple(int(d) for d in input_shape)
        shapes = tuple(tuple(int(d) for d in s) for s in unit_shapes)
        if sum(sizes) != len(shapes) or any(int(s) < 1 for s in sizes):
            raise ValueError(f"sizes {list(sizes)} are not positive unit counts summing to {len(shapes)}")
        stages = shape_stages(shapes)
        stage_of = {u: s for s, (a, b) in enumerate(stages, start=1) for u in range(a, b + 1)}
        modules, start = [], 0
        for module, size in enumerate(sizes, start=1):
            end = start + int(size) - 1
            in_shape = input_shape if start == 0 else shapes[start - 1]
            stage = 0 if start == 0 else stage_of[start - 1]
            modules.append(ModuleLayout(module, (start, end), in_shape, shapes[end], stage))
            start = end + 1
        return cls(input_shape, shapes, stages, tuple(modules))


def shape_stages(unit_shapes: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    """Maximal runs of consecutive units with one output shape, as [first, last] unit ranges."""
    shapes = [tuple(s) for s in unit_shapes]
    stages: list[tuple[int, int]] = []
    for u, shape in enumerate(shapes):
        if stages and shapes[stages[-1][0]] == shape:
            stages[-1] = (stages[-1][0], u)
        else:
            stages.append((u, u))
    return tuple(stages)


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
    """What an objective needs to build an auxiliary head for one module's output.

    The first three fields are all a classic head needs. The rest say where the module sits, for
    heads built from the backbone itself (docs/objectives.md): ``module`` is l of
    ``num_modules`` (1-based; 0 when unknown), ``last_unit`` the module's last minimal unit
    (0-based), ``units`` the backbone's minimal units (to copy, never to share: they are the
    network's own) and ``unit_shapes`` their output shapes (C, H, W).
    """

    shape: Shape  # the module's output h_l: (C, H, W)
    final_shape: Shape  # the backbone's last feature: (C, H, W)
    num_classes: int
    module: int = 0
    num_modules: int = 0
    last_unit: int | None = None
    units: tuple["nn.Module", ...] = attrs.field(default=(), converter=tuple, eq=False, repr=False)
    unit_shapes: tuple[Shape, ...] = attrs.field(default=(), converter=lambda s: tuple(tuple(x) for x in s))

    def unit_input_shape(self, u: int) -> Shape:
        """The shape unit u (u >= 1) takes: the output shape of unit u - 1."""
        return self.unit_shapes[u - 1]


@attrs.frozen
class Costs:
    """What a partitioner's ``split(costs, k)`` is given: per-unit costs, and the network's shapes.

    ``segment(i, j)`` is the cost of one module of units i..j inclusive (0-based): the units'
    ``units`` plus the module's own ``overhead`` when there is a table. Which figures are real:

    - ``units`` / ``overhead``: saved-tensor bytes for backward at ``batch_size`` images, when
      ``measured`` (the engine measures them only for a partitioner with ``needs_costs = True``);
      otherwise ``measured`` is False and ``units`` holds 1.0 per unit, a placeholder that only
      counts units (``Costs.uniform``), never a measurement;
    - ``flops``: forward FLOPs of one image through each unit (``torch.utils.flop_counter``'s
      count: a multiply-add is 2, convolutions and matrix products only), counted for a
      partitioner with ``needs_flops = True``; else None;
    - ``input_shape`` and ``unit_shapes``: x's shape and each unit's output shape (C, H, W),
      always given by the engine (free: one dummy forward pass traces them); empty when unknown.

    A table built by hand (``Costs((4.0, 2.0))``) is taken as measured.
    """

    units: tuple[float, ...]
    overhead: tuple[tuple[float, ...], ...] | None = None  # overhead[i][j], j >= i
    measured: bool = True
    batch_size: int | None = None  # the batch ``units`` and ``overhead`` were counted at
    flops: tuple[float, ...] | None = None  # forward FLOPs per image, per unit
    input_shape: Shape | None = attrs.field(default=None, converter=lambda s: None if s is None else tuple(int(d) for d in s))
    unit_shapes: tuple[Shape, ...] = attrs.field(default=(), converter=lambda s: tuple(tuple(int(d) for d in x) for x in s))

    @property
    def n(self) -> int:
        """The number of units."""
        return len(self.units)

    def segment(self, i: int, j: int) -> float:
        base = sum(self.units[i : j + 1])
        if self.overhead is not None:
            base += self.overhead[i][j - i]
        return base

    @property
    def stages(self) -> tuple[tuple[int, int], ...]:
        """The backbone's resolution stages as [first, last] unit ranges (as ``NetworkLayout.stages``);
        empty without ``unit_shapes``."""
        return shape_stages(self.unit_shapes)

    def unit_input_shape(self, u: int) -> Shape:
        """The shape unit u takes: x's for unit 0, the previous unit's output after."""
        if not self.unit_shapes or self.input_shape is None:
            raise ValueError("these costs carry no shapes (input_shape, unit_shapes)")
        return self.input_shape if u == 0 else self.unit_shapes[u - 1]

    def layout(self, sizes: Sequence[int]) -> NetworkLayout:
        """The :class:`NetworkLayout` the split ``sizes`` would give (each module's shapes and stage)."""
        if not self.unit_shapes or self.input_shape is None:
            raise ValueError("these costs carry no shapes (input_shape, unit_shapes)")
        return NetworkLayout.from_split(self.input_shape, self.unit_shapes, sizes)

    @classmethod
    def uniform(cls, n: int) -> "Costs":
        """No measured costs: 1.0 per unit as a placeholder, ``measured = False``."""
        return cls(tuple(1.0 for _ in range(n)), measured=False)

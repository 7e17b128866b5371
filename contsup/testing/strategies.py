"""Hypothesis strategies for plugin authors' property tests: what contsup's own tests draw.

``costs()`` draws a partitioner's :class:`~contsup.types.Costs` (units, an overhead table,
FLOPs, the network's shapes), ``costs_and_k()`` a table with a K to split it into, ``splits(n)``
the K unit counts of a split, ``unit_shapes()`` a backbone's shapes in resolution stages and
``layouts()`` a :class:`~contsup.types.NetworkLayout`. It needs hypothesis, which contsup itself
does not install (``pip install hypothesis``, or contsup's ``test`` extra).
"""

from __future__ import annotations

try:
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - what a plugin author without hypothesis sees
    raise ImportError(
        "contsup.testing.strategies needs hypothesis, which contsup does not install: pip install hypothesis"
    ) from None

from contsup.types import Costs, NetworkLayout, Shape

# A unit's cost: small integers (ties, zeros) or any size up to a GPU's memory in bytes.
cost_values = st.one_of(st.integers(0, 20).map(float), st.floats(0, 1e9, allow_nan=False, allow_infinity=False))


@st.composite
def unit_shapes(draw, min_units: int = 1, max_units: int = 12, input_shape: Shape = (3, 32, 32)) -> tuple[Shape, tuple[Shape, ...]]:
    """(x's shape, each unit's output shape): 1..4 resolution stages, each a run of units of one
    shape, the channels doubling and the size halving from one stage to the next."""
    n = draw(st.integers(min_units, max_units))
    stages = draw(st.integers(1, min(4, n)))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), min_size=stages - 1, max_size=stages - 1))) if stages > 1 else []
    channels = draw(st.sampled_from((4, 16, 64)))
    size = input_shape[1]
    shapes: list[Shape] = []
    for a, b in zip([0, *cuts], [*cuts, n]):
        shapes += [(channels, size, size)] * (b - a)
        channels, size = channels * 2, max(1, size // 2)
    return tuple(input_shape), tuple(shapes)


@st.composite
def costs(
    draw,
    min_units: int = 1,
    max_units: int = 10,
    *,
    overhead: bool | None = None,
    flops: bool | None = None,
    measured: bool = True,
) -> Costs:
    """A partitioner's ``Costs`` of ``min_units``..``max_units`` units, with the network's shapes.

    ``overhead`` and ``flops``: always (True), never (False) or drawn (None). ``measured =
    False`` gives what a partitioner without ``needs_costs`` gets: 1.0 per unit, no overhead.
    """
    input_shape, shapes = draw(unit_shapes(min_units, max_units))
    n = len(shapes)
    if measured:
        units = tuple(draw(st.lists(cost_values, min_size=n, max_size=n)))
        with_overhead = draw(st.booleans()) if overhead is None else overhead
        table = tuple(tuple(draw(st.lists(cost_values, min_size=n - i, max_size=n - i))) for i in range(n)) if with_overhead else None
        batch = draw(st.sampled_from((8, 64, 128)))
    else:
        units, table, batch = (1.0,) * n, None, None
    with_flops = draw(st.booleans()) if flops is None else flops
    unit_flops = tuple(draw(st.lists(cost_values.map(round).map(float), min_size=n, max_size=n))) if with_flops else None
    return Costs(units, table, measured=measured, batch_size=batch, flops=unit_flops, input_shape=input_shape, unit_shapes=shapes)


@st.composite
def costs_and_k(draw, min_units: int = 1, max_units: int = 10, **options) -> tuple[Costs, int]:
    """A ``costs(...)`` table (same options) and a K from 1 to its number of units."""
    table = draw(costs(min_units, max_units, **options))
    return table, draw(st.integers(1, table.n))


@st.composite
def splits(draw, n: int, k: int | None = None) -> tuple[int, ...]:
    """K positive unit counts summing to ``n`` (K drawn from 1..n when not given)."""
    k = draw(st.integers(1, n)) if k is None else k
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), min_size=k - 1, max_size=k - 1))) if k > 1 else []
    return tuple(b - a for a, b in zip([0, *cuts], [*cuts, n]))


@st.composite
def layouts(draw, min_units: int = 1, max_units: int = 12, max_modules: int | None = None) -> NetworkLayout:
    """The :class:`NetworkLayout` of a ``unit_shapes()`` network cut into a drawn split (at most
    ``max_modules`` modules when given)."""
    input_shape, shapes = draw(unit_shapes(min_units, max_units))
    n = len(shapes)
    k = draw(st.integers(1, min(n, max_modules or n)))
    return NetworkLayout.from_split(input_shape, shapes, draw(splits(n, k)))


__all__ = ["cost_values", "unit_shapes", "costs", "costs_and_k", "splits", "layouts"]

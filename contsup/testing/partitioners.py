"""``check_partitioner``: a partitioner against the engine's contract on many cost tables, every
problem one line naming K and the costs that broke it."""

from __future__ import annotations

import math
import numbers
import random
from typing import Any, Sequence

import attrs

from contsup.errors import ContsupError
from contsup.partition import even_split, split_peak
from contsup.testing.report import Problems, instance, who
from contsup.types import Costs, Shape

# How many units the generated tables have beyond 1..max_units: ResNet-56's and ResNet-110's
# 27 and 55 units (1 + 3 stages of n blocks), split into the paper's K.
LARGE_TABLES = ((27, (1, 2, 4, 8, 16, 27)), (55, (1, 2, 4, 8, 16, 55)))
TOLERANCE = 1e-9  # relative: a balancer may sum a module's costs in another order than split_peak


def check_partitioner(
    partitioner: Any, *, costs: Sequence[Costs] = (), max_units: int = 12, seed: int = 0, generated: bool = True,
) -> None:
    """Check a partitioner (a class, built with default options, or an instance).

    On ``costs`` (the author's own tables) and on generated ones of 1..``max_units`` units (and
    of ResNet-56's and ResNet-110's 27 and 55), for every K from 1 to n: ``split(costs, k)``
    returns K positive integers summing to n (contiguous parts covering every unit, in order),
    the same for equal tables whatever was split before; a partitioner with a ``balances(costs)
    -> Costs`` method, which says it balances those costs, never has a larger module of them
    than the uniform split (``contsup.partition.even_split``) has.

    Generated tables come as the engine would give them: units of 1.0 and ``measured = False``
    unless the partitioner sets ``needs_costs = True``, and no FLOPs unless ``needs_flops =
    True``. A one-line ``contsup.errors.ContsupError`` is a refusal (a recipe the partitioner
    cannot serve) and passes, unless every case is refused. Raises AssertionError listing each
    kind of problem once, with its smallest case. ``generated = False`` checks ``costs`` alone
    (one hypothesis example at a time: ``contsup.testing.strategies.costs()``).
    """
    partitioner = instance(partitioner)
    found = Found()
    _attributes(partitioner, found)
    cases = [(c, k) for c in costs for k in range(1, c.n + 1)]
    if generated:
        cases += [(_as_given(c, partitioner), k) for c, ks in generated_tables(max_units, seed) for k in ks]
    first: list[tuple[int, ...] | None] = [_split(partitioner, c, k, found) for c, k in cases]
    again = {i: _call(partitioner, *cases[i]) for i in reversed(range(len(cases))) if first[i] is not None}  # no state may carry over
    for i in sorted(i for i in again if again[i] != first[i]):
        found.add("state", f"{_case(*cases[i])}: returned {first[i]}, then {again[i]} after splitting other tables; keep no state between calls")
    if cases and found.refused == len(cases):
        found.add("refused", f"refused every case, the first with: {found.refusals[0]}; give check_partitioner(..., costs=[...]) tables it serves")
    problems = Problems(who("partitioner", partitioner), "partitioner")
    for line in found.lines():
        problems.add(line)
    problems.raise_if_any()


class Found:
    """Problems by kind: the first (smallest) case of each, and how many cases share it."""

    def __init__(self) -> None:
        self.kinds: dict[str, list[Any]] = {}
        self.refusals: list[str] = []

    @property
    def refused(self) -> int:
        return len(self.refusals)

    def add(self, kind: str, line: str) -> None:
        entry = self.kinds.setdefault(kind, [line, 0])
        entry[1] += 1

    def lines(self) -> list[str]:
        return [line + (f" (and {n - 1} more cases)" if n > 1 else "") for line, n in self.kinds.values()]


def _attributes(partitioner: Any, found: Found) -> None:
    """What the engine reads from the class besides ``split``."""
    if not isinstance(getattr(partitioner, "name", None), str):
        found.add("name", "'name' must be a string: the name recipes use in [partition] use = ...")
    if not callable(getattr(partitioner, "split", None)):
        found.add("split", "it has no split(costs, k) method")
    for flag in ("needs_costs", "needs_flops"):
        if not isinstance(getattr(partitioner, flag, False), bool):
            found.add(flag, f"'{flag}' must be True or False, not {getattr(partitioner, flag)!r}")
    batch = getattr(partitioner, "cost_batch_size", None)
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        found.add("cost_batch_size", f"'cost_batch_size' must be None or a positive int, not {batch!r}")
    if hasattr(partitioner, "balances") and not callable(partitioner.balances):
        found.add("balances", "'balances' must be a method balances(costs) -> Costs")


def _call(partitioner: Any, costs: Costs, k: int) -> Any:
    try:
        return tuple(partitioner.split(attrs.evolve(costs), k))
    except Exception as exc:  # compared, not raised: the first call already reported it
        return f"{type(exc).__name__}: {exc}"


def _split(partitioner: Any, costs: Costs, k: int, found: Found) -> tuple[int, ...] | None:
    """The checked split of one case, or None when it was refused or broke a rule."""
    n, at = costs.n, _case(costs, k)
    try:
        answer = partitioner.split(costs, k)
    except ContsupError as exc:
        if "\n" in str(exc):
            found.add("multiline", f"{at}: refused with a message of several lines; a ContsupError is one line")
        found.refusals.append(f"ContsupError: {str(exc)[:200]}")
        return None
    except Exception as exc:
        hint = "; the engine gives FLOPs only to a partitioner with needs_flops = True" if costs.flops is None and "NoneType" in str(exc) else ""
        found.add(
            f"raised {type(exc).__name__}",
            f"{at}: split raised {type(exc).__name__}: {str(exc)[:200]}{hint}; refuse a case with a one-line contsup.errors.ContsupError",
        )
        return None
    try:
        answer = list(answer)  # a generator is read once
    except TypeError:
        found.add("type", f"{at}: returned {_show(answer)}, which is not a sequence of unit counts")
        return None
    problem = _shape_problem(answer, n, k)
    if problem:
        found.add(problem[0], f"{at}: returned {_show(answer)}, {problem[1]}")
        return None
    sizes = tuple(int(s) for s in answer)
    again = _call(partitioner, costs, k)
    if again != sizes:
        found.add("deterministic", f"{at}: returned {sizes}, then {again} for an equal table; it must give the same every time (a trained model is rebuilt from its recipe)")
        return None
    _check_balance(partitioner, costs, k, sizes, found, at)
    return sizes


def _shape_problem(sizes: list, n: int, k: int) -> tuple[str, str] | None:
    """(kind, what is wrong) when ``sizes`` are not K positive integers summing to n."""
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in sizes):
        return "type", "which holds something other than integers"
    if len(sizes) != k:
        return "count", f"{len(sizes)} parts; expected K = {k}"
    if min(sizes) < 1:
        return "empty", "an empty or negative part; every module needs at least one unit"
    if sum(sizes) != n:
        return "cover", f"which covers {sum(sizes)} units; the K parts must cover all {n}, each once"
    return None


def _check_balance(partitioner: Any, costs: Costs, k: int, sizes: tuple[int, ...], found: Found, at: str) -> None:
    """A partitioner that says it balances some costs keeps their peak at or below the uniform split's."""
    balances = getattr(partitioner, "balances", None)
    if not callable(balances):
        return
    try:
        balanced = balances(costs)
        peak, uniform = split_peak(balanced, sizes), split_peak(balanced, even_split(costs.n, k))
    except Exception as exc:
        found.add("balances raised", f"{at}: balances(costs) raised {type(exc).__name__}: {str(exc)[:200]}")
        return
    if peak > uniform + TOLERANCE * abs(uniform) and not (math.isinf(peak) and math.isinf(uniform)):
        found.add(
            "balance",
            f"{at}: its split {sizes} has a largest module of {peak:.10g} of the costs it balances, the uniform split "
            f"{even_split(costs.n, k)} only {uniform:.10g}; a balancing split is never worse than the uniform one",
        )


def _show(answer: Any) -> str:
    text = repr(tuple(answer)) if isinstance(answer, (list, tuple)) else repr(answer)
    return text if len(text) <= 120 else text[:117] + "..."


def _numbers(values: Sequence[float]) -> str:
    shown = ", ".join(f"{v:.10g}" for v in values[:12])
    return f"[{shown}{', ...' if len(values) > 12 else ''}]"


def _case(costs: Costs, k: int) -> str:
    """'K = 2 of units = [3, 1, 4] (n = 3, with an overhead table)': enough to rebuild the case."""
    parts = [f"n = {costs.n}"]
    if not costs.measured:
        parts.append("not measured")
    if costs.overhead is not None:
        rows = ", ".join(_numbers(row) for row in costs.overhead)
        parts.append(f"overhead = [{rows}]" if costs.n <= 3 else "with an overhead table")
    if costs.flops is not None:
        parts.append(f"flops = {_numbers(costs.flops)}")
    return f"K = {k} of units = {_numbers(costs.units)} ({', '.join(parts)})"


def _as_given(costs: Costs, partitioner: Any) -> Costs:
    """A generated table as the engine would give it to this partitioner."""
    if not getattr(partitioner, "needs_costs", False):
        costs = attrs.evolve(costs, units=(1.0,) * costs.n, overhead=None, measured=False, batch_size=None)
    if not getattr(partitioner, "needs_flops", False):
        costs = attrs.evolve(costs, flops=None)
    return costs


# -- generated tables ------------------------------------------------------------------------------


def generated_tables(max_units: int, seed: int = 0) -> list[tuple[Costs, tuple[int, ...]]]:
    """Cost tables with every number of units up to ``max_units`` (three each: plain, small
    integers, with an overhead table), tables that tie everywhere or hold one heavy unit, and
    ResNet-56/110-sized ones; each with the Ks to split it into. Seeded: the same every run."""
    rng = random.Random(seed)
    out = []
    for n in range(1, max_units + 1):
        ks = tuple(range(1, n + 1))
        out.append((random_costs(rng, n), ks))
        out.append((random_costs(rng, n, integers=True), ks))
        out.append((random_costs(rng, n, overhead=True), ks))
        if n >= 2:
            for units in ((0.0,) * n, (1.0,) * n, tuple(1e9 if u == n // 2 else 1.0 for u in range(n))):
                out.append((attrs.evolve(random_costs(rng, n), units=units), ks))
    for n, ks in LARGE_TABLES:
        out.append((random_costs(rng, n), ks))
    return out


def random_costs(rng: random.Random, n: int, *, integers: bool = False, overhead: bool = False) -> Costs:
    """A table of n units: costs (whole numbers up to 1e9, or 0..20, so a report shows them
    exactly), FLOPs, shapes in stages."""
    value = (lambda: float(rng.randint(0, 20))) if integers else (lambda: 0.0 if rng.random() < 0.2 else float(rng.randint(1, 10**9)))
    units = tuple(value() for _ in range(n))
    table = tuple(tuple(value() for _ in range(n - i)) for i in range(n)) if overhead else None
    flops = tuple(0.0 if rng.random() < 0.2 else float(rng.randint(1, 10**9)) for _ in range(n))
    input_shape, shapes = random_shapes(rng, n)
    return Costs(units, table, batch_size=rng.choice((8, 128)), flops=flops, input_shape=input_shape, unit_shapes=shapes)


def random_shapes(rng: random.Random, n: int) -> tuple[Shape, tuple[Shape, ...]]:
    """x's shape and n unit output shapes in 1..4 stages: channels double and size halves per stage."""
    stages = rng.randint(1, min(4, n))
    cuts = sorted(rng.sample(range(1, n), stages - 1))
    lengths = [b - a for a, b in zip([0, *cuts], [*cuts, n])]
    channels, size = rng.choice((4, 16, 64)), 32
    shapes: list[Shape] = []
    for length in lengths:
        shapes += [(channels, size, size)] * length
        channels, size = channels * 2, max(1, size // 2)
    return (3, 32, 32), tuple(shapes)


__all__ = ["check_partitioner", "generated_tables", "random_costs", "random_shapes"]

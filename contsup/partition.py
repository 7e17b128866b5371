"""Cutting a sequence into contiguous parts: the even split, and the exact min-max split of costs.

:func:`even_split` is the one even cut (the ``uniform`` partitioner's, the cost model's assumed
split, activation checkpointing's segments). :func:`min_max_split` serves every balancer: the ``memory_balanced`` partitioner (units into modules, by
measured memory) and the pipeline (modules into stages, by measured time). Partitioner plugins
may use it too.
"""

from __future__ import annotations

import math

from contsup.types import Costs


def even_split(n: int, k: int, larger_first: bool = False) -> tuple[int, ...]:
    """``n`` items into ``k`` contiguous parts as equal as possible: when ``k`` does not divide
    ``n`` the earlier parts hold one fewer (55 units, K=4 -> 13, 14, 14, 14), or one more with
    ``larger_first`` (17, 4 -> 5, 4, 4, 4)."""
    if not 1 <= k <= n:
        raise ValueError(f"cannot cut {n} units into {k} non-empty parts")
    base, extra = divmod(n, k)
    if larger_first:
        return tuple(base + (1 if i < extra else 0) for i in range(k))
    return tuple(base + (1 if i >= k - extra else 0) for i in range(k))


def split_peak(costs: Costs, sizes: tuple[int, ...]) -> float:
    """The largest module cost of a split: max over modules of ``costs.segment(first, last)``."""
    peak, start = -math.inf, 0
    for size in sizes:
        peak = max(peak, costs.segment(start, start + size - 1))
        start += size
    return peak


def min_max_split(costs: Costs, k: int) -> tuple[int, ...]:
    """The contiguous split into K modules whose largest ``costs.segment`` is smallest.

    Exact (dynamic programming, O(K n^2) segment lookups). Among optimal splits it returns the
    one with the earliest cuts: the lexicographically smallest tuple of unit counts, i.e. the
    first module as short as an optimal split allows, then the second, and so on.
    """
    n = len(costs.units)
    if not 1 <= k <= n:
        raise ValueError(f"cannot cut {n} units into {k} non-empty modules")
    seg = [[float(costs.segment(i, j)) for j in range(i, n)] for i in range(n)]  # seg[i][j - i]
    if any(math.isnan(v) for row in seg for v in row):
        raise ValueError("costs contain NaN")
    # best[m][i]: the smallest peak of units i..n-1 cut into m modules (inf when impossible)
    best = [[math.inf] * (n + 1) for _ in range(k + 1)]
    best[0][n] = -math.inf
    for m in range(1, k + 1):
        row, rest = best[m], best[m - 1]
        for i in range(n - m, -1, -1):
            seg_i = seg[i]
            value = math.inf
            for e in range(i, n - m + 1):
                v = max(seg_i[e - i], rest[e + 1])
                if v < value:
                    value = v
            row[i] = value
    peak = best[k][0]
    sizes, i = [], 0
    for m in range(k, 0, -1):
        rest = best[m - 1]
        for e in range(i, n - m + 1):  # the earliest end that still allows an optimal split
            if seg[i][e - i] <= peak and rest[e + 1] <= peak:
                break
        sizes.append(e - i + 1)
        i = e + 1
    return tuple(sizes)


__all__ = ["even_split", "min_max_split", "split_peak"]

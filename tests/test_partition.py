"""The uniform partitioner: K non-empty contiguous modules, sizes differ by at most one,
earlier modules never larger than later ones; the paper's ResNet-110 and ResNet-32 cuts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contsup.types import Costs
from contsup_partition import Uniform, uniform_split


@st.composite
def n_and_k(draw):
    n = draw(st.integers(1, 200))
    return n, draw(st.integers(1, n))


@given(n_and_k())
def test_uniform_split_invariants(nk):
    n, k = nk
    sizes = Uniform(Uniform.Options()).split(Costs.uniform(n), k)
    assert len(sizes) == k and sum(sizes) == n and min(sizes) >= 1
    assert max(sizes) - min(sizes) <= 1
    assert list(sizes) == sorted(sizes)  # never larger earlier than later


@pytest.mark.parametrize(
    "n, k, expected",
    [
        (55, 2, (27, 28)),
        (55, 4, (13, 14, 14, 14)),
        (55, 16, (3,) * 9 + (4,) * 7),
        (16, 16, (1,) * 16),
        (16, 2, (8, 8)),
        (16, 4, (4, 4, 4, 4)),
        (16, 8, (2,) * 8),
    ],
)
def test_paper_cuts(n, k, expected):
    assert uniform_split(n, k) == expected


@pytest.mark.parametrize("n, k", [(3, 4), (5, 0)])
def test_impossible_cuts_are_refused(n, k):
    with pytest.raises(ValueError):
        uniform_split(n, k)

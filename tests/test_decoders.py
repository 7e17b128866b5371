"""The InfoPro decoder: reconstruction shape, loss target, and the interpolated loss weights."""

from __future__ import annotations

import pytest
import torch

from contsup.testing import check_decoder
from contsup.types import DatasetInfo
from contsup_decoders import InfoPro, interpolated_weights, unnormalise

INFO = DatasetInfo((3, 32, 32), 10, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


@pytest.mark.parametrize("feature_shape", [(16, 32, 32), (32, 16, 16), (64, 8, 8)])
def test_decoder_reconstructs_to_the_input_shape(feature_shape):
    decoder = InfoPro(InfoPro.Options(ixx_1=1, ixy_1=1, ixx_2=0, ixy_2=1)).build(feature_shape, INFO)
    with torch.no_grad():
        out = decoder(torch.randn(2, *feature_shape))
    assert out.shape == (2, 3, 32, 32) and float(out.min()) >= 0 and float(out.max()) <= 1


def test_loss_compares_with_the_unnormalised_input():
    infopro = InfoPro(InfoPro.Options(ixx_1=1, ixy_1=1, ixx_2=0, ixy_2=1))
    x01 = torch.rand(2, 3, 32, 32) * 0.98 + 0.01
    mean = torch.tensor(INFO.mean).view(1, 3, 1, 1)
    std = torch.tensor(INFO.std).view(1, 3, 1, 1)
    x = (x01 - mean) / std
    assert torch.allclose(unnormalise(x, INFO), x01, atol=1e-6)
    perfect = infopro.loss(x01, x, INFO)
    worse = infopro.loss(1 - x01, x, INFO)
    assert float(perfect) < float(worse)


@pytest.mark.parametrize("k", [2, 3, 4, 8, 16])
def test_weights_interpolate_from_module_1_to_module_k_minus_1(k):
    o = InfoPro.Options(ixx_1=5.0, ixy_1=0.05, ixx_2=0.2, ixy_2=0.5)
    infopro = InfoPro(o)
    assert infopro.weights(1, k) == pytest.approx((5.0, 0.05))
    if k > 2:
        assert infopro.weights(k - 1, k) == pytest.approx((0.2, 0.5))
        for l in range(1, k):
            t = (l - 1) / (k - 2)
            assert infopro.weights(l, k) == pytest.approx((5.0 + t * (0.2 - 5.0), 0.05 + t * (0.5 - 0.05)))
    assert interpolated_weights(1, 2, (1.0, 2.0), (3.0, 4.0)) == (1.0, 2.0)


@pytest.mark.parametrize("k", [3, 4, 5, 8, 16])
def test_weights_are_the_written_values_exactly_at_both_ends(k):
    first, last = (1.0, 0.0), (0.2, 1.0)  # a + 1 * (b - a) would give 0.19999999999999996 or 0.20000000000000018
    assert interpolated_weights(1, k, first, last) == first
    assert interpolated_weights(k - 1, k, first, last) == last


@pytest.mark.parametrize("weights", [(1.0, 1.0, 0.0, 1.0), (5.0, 0.05, 0.2, 0.5)])
def test_infopro_keeps_the_decoder_contract(weights):
    """x's shape from every stage, a finite loss reaching h and the decoder only, weights >= 0."""
    check_decoder(InfoPro(InfoPro.Options(**dict(zip(("ixx_1", "ixy_1", "ixx_2", "ixy_2"), weights)))))

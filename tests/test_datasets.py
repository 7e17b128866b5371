"""Datasets: digits (fixed split, normalisation constants match the data) and synthetic."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

from contsup_datasets import Digits, Synthetic
from contsup_datasets import digits as digits_module


def test_digits_normalisation_constants_match_the_data():
    images = load_digits().images / 16.0
    assert abs(images.mean() - digits_module.MEAN) < 1e-3
    assert abs(images.std() - digits_module.STD) < 1e-3


def test_digits_split_is_fixed_disjoint_and_complete():
    d = Digits(Digits.Options(size=8))
    train, test = d.load(train=True), d.load(train=False)
    assert len(train) + len(test) == 1797 and len(test) == 360
    again = Digits(Digits.Options(size=8)).load(train=False)
    assert torch.equal(test.tensors[0], again.tensors[0])
    train_rows = {tuple(np.round(r.numpy().ravel(), 4)) for r in train.tensors[0]}
    shared = sum(tuple(np.round(r.numpy().ravel(), 4)) in train_rows for r in test.tensors[0])
    assert shared < 5  # the digits data has a handful of exact duplicate images, no more
    assert sorted(torch.bincount(test.tensors[1]).tolist())[0] >= 34  # stratified


def test_digits_are_upsampled_and_normalised():
    d = Digits(Digits.Options(size=16))
    x, y = d.load(train=True)[0]
    assert x.shape == (1, 16, 16) and d.info().input_shape == (1, 16, 16) and 0 <= int(y) < 10
    assert abs(float(d.load(train=True).tensors[0].mean())) < 0.1


def test_synthetic_is_deterministic_and_shaped():
    s = Synthetic(Synthetic.Options(shape=(2, 5, 7), classes=3, train_size=10, test_size=4, seed=3))
    a, b = s.load(train=True), s.load(train=True)
    assert torch.equal(a.tensors[0], b.tensors[0]) and a.tensors[0].shape == (10, 2, 5, 7)
    assert not torch.equal(a.tensors[0][:4], s.load(train=False).tensors[0])
    assert s.info().num_classes == 3 and int(a.tensors[1].max()) < 3


def test_synthetic_accepts_every_toml_integer_as_seed():
    for seed in (-(2**63), -1, 2**63 - 1):
        s = Synthetic(Synthetic.Options(shape=(1, 2, 2), train_size=2, test_size=2, seed=seed))
        assert s.load(train=True).tensors[0].shape == s.load(train=False).tensors[0].shape == (2, 1, 2, 2)

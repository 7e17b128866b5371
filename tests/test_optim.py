"""The recipe's optimizers: the multi-tensor (foreach) SGD the recipes build updates exactly as
the per-tensor loop does."""

from __future__ import annotations

import pytest
import torch

from contsup.config.optim import SGD


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sgd_uses_the_multi_tensor_update_and_matches_the_per_tensor_loop_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 3, 3, 3), (8,), (8,), (10, 8), (10,)]
    start = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    ours = [t.clone().requires_grad_(True) for t in start]
    loop = [t.clone().requires_grad_(True) for t in start]
    options = SGD.Options(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    built = SGD(options).build(ours)
    assert built.defaults["foreach"] is True
    reference = torch.optim.SGD(loop, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=False)
    for _ in range(4):
        for a, b in zip(ours, loop):
            a.grad = torch.randn(a.shape, generator=g, dtype=dtype)
            b.grad = a.grad.clone()
        built.step()
        reference.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, loop))
    assert not all(torch.equal(a, s) for a, s in zip(ours, start))  # they did move

"""The context plugin's adapters: the paper's M_E and M_R (:mod:`contsup.adapters`, re-exported
here) and the plugin's own variants, a fast M_E and the official code's M_R.

Each maps a source tensor to the shape of the module input h it is added to.
"""

from __future__ import annotations

import torch
from torch import nn

from contsup.adapters import InputEncoder, ShortcutAdapter, paper_adapter, pool_to
from contsup.types import Shape


class FastInputEncoder(nn.Module):
    """M_E, fast variant: adaptive average pool x to h's size, then one 3x3 conv+BN+ReLU to h's
    channels. x: (B, C_x, H_x, W_x) -> (B, C_h, H_h, W_h).

    Not the paper's function: one layer instead of two, at h's resolution instead of x's. Its
    cost per module is a fraction of one backbone convolution (C_x input channels, not C_h).
    """

    adapter_kind = "M_E fast"  # what contsup plan calls it

    def __init__(self, source_shape: Shape, target_shape: Shape) -> None:
        super().__init__()
        self.pool = pool_to(target_shape[1:], source_shape[1:])
        self.conv = nn.Conv2d(source_shape[0], target_shape[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(target_shape[0])
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(self.pool(x))))


class OfficialShortcutAdapter(nn.Module):
    """M_R as the official code builds it: 1x1 conv, BN, ReLU, then adaptive average pool.

    The BN and ReLU sit between conv and pool, so the pool cannot move first.
    """

    adapter_kind = "M_R official"  # what contsup plan calls it

    def __init__(self, source_shape: Shape, target_shape: Shape) -> None:
        super().__init__()
        self.conv = nn.Conv2d(source_shape[0], target_shape[0], 1, bias=False)
        self.bn = nn.BatchNorm2d(target_shape[0])
        self.act = nn.ReLU(inplace=True)
        self.pool = pool_to(target_shape[1:], source_shape[1:])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.bn(self.conv(h))))


__all__ = ["InputEncoder", "ShortcutAdapter", "paper_adapter", "FastInputEncoder", "OfficialShortcutAdapter"]

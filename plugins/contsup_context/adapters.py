"""The context plugin's adapters: the paper's and the official code's M_E and M_R
(:mod:`contsup.adapters`, re-exported here) and the plugin's own fast M_E.

Each maps a source tensor to the shape of the module input h it is added to.
"""

from __future__ import annotations

import torch
from torch import nn

from contsup.adapters import (
    OFFICIAL_ENCODER_WIDTH, InputEncoder, OfficialShortcutAdapter, ShortcutAdapter, official_adapter, paper_adapter,
)
from contsup.layers import conv_bn_relu, pool_to
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
        self.conv, self.bn, self.act = conv_bn_relu(source_shape[0], target_shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(self.pool(x))))


__all__ = [
    "InputEncoder", "ShortcutAdapter", "paper_adapter", "official_adapter", "FastInputEncoder", "OfficialShortcutAdapter",
    "OFFICIAL_ENCODER_WIDTH",
]

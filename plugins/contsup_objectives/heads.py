"""Auxiliary classifiers A_l: small heads that turn a module's output into a local prediction."""

from __future__ import annotations

import torch
from torch import nn

from contsup.types import HeadSpec


def conv_plan(spec: HeadSpec) -> tuple[int, int]:
    """(stride, width) of the head's 3x3 conv, as in the paper's Table 6: stride 2 and twice the
    channels while the feature is larger than the backbone's last feature (CIFAR: 16 -> 32,
    32 -> 64), stride 1 and the same channels at the last stage (64 -> 64)."""
    channels, height = spec.shape[0], spec.shape[1]
    if height > spec.final_shape[1]:
        return 2, 2 * channels
    return 1, channels


class AuxClassifier(nn.Module):
    """3x3 conv + BN + ReLU, global average pool, FC to ``hidden``, ReLU, FC to ``out``.

    h: (B, C, H, W) -> (B, out).
    """

    def __init__(self, spec: HeadSpec, out: int, hidden: int = 128) -> None:
        super().__init__()
        stride, width = conv_plan(spec)
        self.conv = nn.Conv2d(spec.shape[0], width, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(width, hidden)
        self.act1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.pool(self.act(self.bn(self.conv(h)))).flatten(1)
        return self.fc2(self.act1(self.fc1(z)))

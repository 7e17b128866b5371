"""Auxiliary classifiers A_l: small heads that turn a module's output into a local prediction.

A variant's name counts its layers: ``1c2f`` is one 3x3 conv (+BN+ReLU) then two fully connected
layers, the paper's default (Table 6). The conv's stride and width follow the feature (see
:func:`conv_plan`); the hidden fully connected layers have ``hidden`` units.
"""

from __future__ import annotations

import torch
from torch import nn

from contsup.types import HeadSpec

VARIANTS = ("0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f")  # the recipe key's choices (HeadVariant; a test keeps them equal)


def conv_plan(spec: HeadSpec) -> tuple[int, int]:
    """(stride, width) of the head's first 3x3 conv, as in the paper's Table 6: stride 2 and twice
    the channels while the feature is larger than the backbone's last feature (CIFAR: 16 -> 32,
    32 -> 64), stride 1 and the same channels at the last stage (64 -> 64)."""
    channels, height = spec.shape[0], spec.shape[1]
    if height > spec.final_shape[1]:
        return 2, 2 * channels
    return 1, channels


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class AuxClassifier(nn.Module):
    """An auxiliary head: ``convs`` 3x3 conv+BN+ReLU layers, global average pool, ``fcs`` fully
    connected layers (ReLU between them) ending in ``out`` units. h: (B, C, H, W) -> (B, out)."""

    def __init__(self, spec: HeadSpec, out: int, hidden: int = 128, variant: str = "1c2f") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown head variant '{variant}'; choose one of {', '.join(VARIANTS)}")
        convs, fcs = int(variant[0]), int(variant[2])
        self.variant = variant
        layers: list[nn.Module] = []
        width = spec.shape[0]
        if convs:
            stride, conv_width = conv_plan(spec)
            layers += _conv_bn_relu(width, conv_width, stride)
            layers += [m for _ in range(convs - 1) for m in _conv_bn_relu(conv_width, conv_width, 1)]
            width = conv_width
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        dims = [width] + [hidden] * (fcs - 1) + [out]
        fc: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            fc.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                fc.append(nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(*fc)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(h)))


class Normalized(nn.Module):
    """Rows of the wrapped head's output scaled to unit L2 norm: (B, D) -> (B, D)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.head(h), dim=1)

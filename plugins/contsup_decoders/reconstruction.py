"""The network of InfoPro's decoder; its own module so that importing ``contsup_decoders`` (every
``contsup`` command does, to list the decoders) does not import torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from contsup.types import Shape


class ReconstructionDecoder(nn.Module):
    """Bilinear upsampling to the input size, 3x3 conv to ``width`` + BN + ReLU, 3x3 conv to the
    input's channels, sigmoid. h: (B, C, H, W) -> (B, C_x, H_x, W_x) in [0, 1]."""

    def __init__(self, feature_shape: Shape, input_shape: Shape, width: int = 12) -> None:
        super().__init__()
        self.size = tuple(input_shape[1:])
        self.conv1 = nn.Conv2d(feature_shape[0], width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, input_shape[0], 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if tuple(h.shape[-2:]) != self.size:
            h = F.interpolate(h, size=self.size, mode="bilinear", align_corners=True)
        return torch.sigmoid(self.conv2(self.act1(self.bn1(self.conv1(h)))))

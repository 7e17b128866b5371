"""Built-in decoders: InfoPro's reconstruction of the input from a module's output.

With a decoder, module l's loss is ``ixx_l * reconstruction + ixy_l * local`` where (ixx_l, ixy_l)
go linearly from (ixx_1, ixy_1) at module 1 to (ixx_2, ixy_2) at module K-1, the parametrisation
of InfoPro's published tables. The last module keeps plain cross-entropy.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from contsup import hookimpl
from contsup.options import at_least, option
from contsup.types import DatasetInfo, Shape


def interpolated_weights(module: int, num_modules: int, first: tuple[float, float], last: tuple[float, float]) -> tuple[float, float]:
    """(ixx_l, ixy_l) for 1-based ``module`` < K: ``first`` at module 1, ``last`` at module K-1."""
    if num_modules <= 2:
        return first
    t = (module - 1) / (num_modules - 2)
    # (1 - t) a + t b rather than a + t (b - a): exactly ``first`` at t = 0 and ``last`` at t = 1
    return tuple((1 - t) * a + t * b for a, b in zip(first, last))  # type: ignore[return-value]


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


def unnormalise(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """The dataset's normalised input mapped back to [0, 1]: x * std + mean, clamped."""
    mean = torch.tensor(info.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * std + mean).clamp(0.0, 1.0)


class InfoPro:
    """InfoPro's decoder: reconstruct x from h_l, binary cross-entropy against x in [0, 1]."""

    name = "infopro"

    @attrs.frozen
    class Options:
        ixx_1: float = option(doc="weight of the reconstruction loss at module 1", validator=at_least(0.0))
        ixy_1: float = option(doc="weight of the local objective at module 1", validator=at_least(0.0))
        ixx_2: float = option(doc="weight of the reconstruction loss at module K-1", validator=at_least(0.0))
        ixy_2: float = option(doc="weight of the local objective at module K-1", validator=at_least(0.0))
        width: int = option(12, doc="channels of the decoder's hidden conv", validator=at_least(1))

    def __init__(self, options: "InfoPro.Options") -> None:
        self.options = options

    def build(self, feature_shape: Shape, info: DatasetInfo) -> nn.Module:
        return ReconstructionDecoder(feature_shape, tuple(info.input_shape), self.options.width)

    def loss(self, reconstruction: torch.Tensor, x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
        target = unnormalise(x, info)
        with torch.autocast(device_type=reconstruction.device.type, enabled=False):
            return F.binary_cross_entropy(reconstruction.float(), target.float())

    def weights(self, module: int, num_modules: int) -> tuple[float, float]:
        o = self.options
        return interpolated_weights(module, num_modules, (o.ixx_1, o.ixy_1), (o.ixx_2, o.ixy_2))


@hookimpl
def register_decoders(register):
    register(InfoPro)

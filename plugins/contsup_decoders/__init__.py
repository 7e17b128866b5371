"""Built-in decoders: InfoPro's reconstruction of the input from a module's output.

With a decoder, module l's loss is ``ixx_l * reconstruction + ixy_l * local`` where (ixx_l, ixy_l)
go linearly from (ixx_1, ixy_1) at module 1 to (ixx_2, ixy_2) at module K-1, the parametrisation
of InfoPro's published tables. The last module keeps plain cross-entropy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from contsup import hookimpl
from contsup.options import at_least, option
from contsup.types import DatasetInfo, Shape

if TYPE_CHECKING:  # annotations only: the decoder network (and torch) load when the first one is built
    import torch
    from torch import nn


def interpolated_weights(module: int, num_modules: int, first: tuple[float, float], last: tuple[float, float]) -> tuple[float, float]:
    """(ixx_l, ixy_l) for 1-based ``module`` < K: ``first`` at module 1, ``last`` at module K-1."""
    if num_modules <= 2:
        return first
    t = (module - 1) / (num_modules - 2)
    # (1 - t) a + t b rather than a + t (b - a): exactly ``first`` at t = 0 and ``last`` at t = 1
    return tuple((1 - t) * a + t * b for a, b in zip(first, last))  # type: ignore[return-value]


def unnormalise(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """The dataset's normalised input mapped back to [0, 1]: x * std + mean, clamped."""
    import torch

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
        from contsup_decoders.reconstruction import ReconstructionDecoder

        return ReconstructionDecoder(feature_shape, tuple(info.input_shape), self.options.width)

    def loss(self, reconstruction: torch.Tensor, x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        target = unnormalise(x, info)
        with torch.autocast(device_type=reconstruction.device.type, enabled=False):
            return F.binary_cross_entropy(reconstruction.float(), target.float())

    def weights(self, module: int, num_modules: int) -> tuple[float, float]:
        o = self.options
        return interpolated_weights(module, num_modules, (o.ixx_1, o.ixy_1), (o.ixx_2, o.ixy_2))


@hookimpl
def register_decoders(register):
    register(InfoPro)


def __getattr__(name: str) -> Any:
    """The decoder network (``from contsup_decoders import ReconstructionDecoder``), which lives in
    ``contsup_decoders.reconstruction``, imported on first use (it needs torch)."""
    if name == "ReconstructionDecoder":
        from contsup_decoders.reconstruction import ReconstructionDecoder

        return ReconstructionDecoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

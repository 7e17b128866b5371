"""Seeded random images of any shape: one noisy template per class, so they can be learned."""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from contsup.options import at_least, between, option
from contsup.types import DatasetInfo

if TYPE_CHECKING:  # annotations only: loading imports torch, listing does not
    from torch.utils.data import TensorDataset


def _shape(instance, attribute, value) -> None:
    if len(value) != 3 or min(value) < 1:
        raise ValueError(f"must be [channels, height, width] of positive integers, got {list(value)}")


class Synthetic:
    """Class c's images are template_c + noise * N(0, 1); templates and noise come from ``seed``."""

    name = "synthetic"

    @attrs.frozen
    class Options:
        shape: tuple[int, ...] = option((3, 32, 32), doc="image shape [channels, height, width]", validator=_shape)
        classes: int = option(10, doc="number of classes", validator=at_least(2))
        train_size: int = option(256, doc="number of training images", validator=at_least(1))
        test_size: int = option(128, doc="number of test images", validator=at_least(1))
        noise: float = option(
            1.0, doc="standard deviation of the noise added to the class template",
            validator=between(0.0, 1e6),  # images of 1e19 overflow float32 in batch-norm variances: NaN losses
        )
        seed: int = option(0, doc="seed of the templates and the noise (independent of run.seed)")

    def __init__(self, options: "Synthetic.Options") -> None:
        self.options = options

    def info(self) -> DatasetInfo:
        c = self.options.shape[0]
        return DatasetInfo(input_shape=tuple(self.options.shape), num_classes=self.options.classes, mean=(0.0,) * c, std=(1.0,) * c)

    def load(self, train: bool) -> TensorDataset:
        import torch
        from torch.utils.data import TensorDataset

        o = self.options
        gen = torch.Generator().manual_seed(o.seed)
        templates = torch.randn((o.classes, *o.shape), generator=gen)
        gen.manual_seed((o.seed * 2 + (1 if train else 2)) % 2**64)  # any TOML integer seed (a negative one too)
        n = o.train_size if train else o.test_size
        y = torch.randint(0, o.classes, (n,), generator=gen)
        x = templates[y] + o.noise * torch.randn((n, *o.shape), generator=gen)
        return TensorDataset(x, y)

"""scikit-learn's bundled 8x8 handwritten digits: real data that needs no download."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import attrs
import numpy as np

from contsup.options import at_least, between, in_range, option
from contsup.types import DatasetInfo

if TYPE_CHECKING:  # annotations only: loading imports torch (and scikit-learn), listing does not
    import torch
    from torch.utils.data import TensorDataset

# Mean and standard deviation of all 1,797 images scaled to [0, 1] (tests/test_datasets.py
# recomputes them from the data).
MEAN = 0.3053
STD = 0.3760


class Digits:
    """1,797 grey 8x8 digits (10 classes), split once with a fixed seed, upsampled bilinearly."""

    name = "digits"

    @attrs.frozen
    class Options:
        size: int = option(32, doc="side of the square images fed to the network (bilinear upsampling from 8)", validator=at_least(8))
        test_fraction: float = option(0.2, doc="share of the images held out for testing (stratified)", validator=in_range(0.05, 0.5))
        split_seed: int = option(
            0, doc="seed of the fixed train/test split (independent of run.seed)",
            validator=between(0, 2**32 - 1),  # what scikit-learn takes as a random_state
        )

    def __init__(self, options: "Digits.Options") -> None:
        self.options = options

    def info(self) -> DatasetInfo:
        return DatasetInfo(input_shape=(1, self.options.size, self.options.size), num_classes=10, mean=(MEAN,), std=(STD,))

    def load(self, train: bool) -> TensorDataset:
        import torch
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from torch.utils.data import TensorDataset

        digits = load_digits()
        images = digits.images.astype(np.float32) / 16.0
        index = np.arange(len(images))
        train_idx, test_idx = train_test_split(
            index, test_size=self.options.test_fraction, random_state=self.options.split_seed, stratify=digits.target
        )
        chosen = np.sort(train_idx if train else test_idx)
        x = self._inputs(torch.from_numpy(images[chosen]).unsqueeze(1))
        y = torch.from_numpy(digits.target[chosen].astype(np.int64))
        return TensorDataset(x.contiguous(), y)

    def _inputs(self, x: "torch.Tensor") -> "torch.Tensor":
        """8x8 images scaled to [0, 1] (B, 1, 8, 8) -> the network's inputs (B, 1, size, size):
        upsampled bilinearly, normalised."""
        import torch.nn.functional as F

        size = self.options.size
        if size != 8:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return (x - MEAN) / STD

    def image_transform(self) -> Callable[[Any], Any]:
        """One 8x8 grey image file (a digit as the dataset holds it: 0 background, 255 full ink) ->
        the tensor the test split holds for it (``contsup predict``). Another size, or an image
        in colour, is refused (ValueError): the network saw neither."""

        def transform(image: Any) -> Any:
            import torch

            if tuple(image.size) != (8, 8):
                width, height = image.size
                raise ValueError(f"{width}x{height} pixels; digits networks take 8x8 grey images (the dataset's own size)")
            grey = _grey(image)
            x = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)
            return self._inputs(x[None, None])[0]

        return transform


def _grey(image: Any) -> Any:
    """``image`` as an 8-bit grey (mode L) PIL image; ValueError for colour or a mode of more than 8 bits."""
    if image.mode in ("L", "LA", "1"):
        return image.convert("L")
    if image.mode in ("RGB", "RGBA", "P"):
        rgb = np.asarray(image.convert("RGB"))
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return image.convert("RGB").convert("L")
        raise ValueError(f"a colour image (mode {image.mode}); digits networks take grey images (mode L)")
    raise ValueError(f"mode {image.mode}; digits networks take 8-bit grey images (mode L)")

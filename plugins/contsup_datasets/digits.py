"""scikit-learn's bundled 8x8 handwritten digits: real data that needs no download."""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import numpy as np

from contsup.options import at_least, between, in_range, option
from contsup.types import DatasetInfo

if TYPE_CHECKING:  # annotations only: loading imports torch (and scikit-learn), listing does not
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
        import torch.nn.functional as F
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
        x = torch.from_numpy(images[chosen]).unsqueeze(1)
        size = self.options.size
        if size != 8:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = (x - MEAN) / STD
        y = torch.from_numpy(digits.target[chosen].astype(np.int64))
        return TensorDataset(x.contiguous(), y)

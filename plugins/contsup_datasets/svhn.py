"""SVHN (house-number digits) through torchvision, with the paper's preprocessing: zero-pad 2
and random 32x32 crop for training (no flip: digits are not mirror-symmetric); normalisation
to [-1, 1] for both splits."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import attrs

from contsup.options import option
from contsup.types import DatasetInfo
from contsup_datasets.files import DataFiles, check_labels, fixed_size_images, non_empty, open_dataset

if TYPE_CHECKING:  # annotations only: torchvision (seconds to import) loads with the files, not with the listing
    from torchvision import datasets, transforms

CLASSES = tuple(str(d) for d in range(10))  # the .mat files label digit 0 as 10; torchvision maps it to 0
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def svhn_transform(train: bool) -> transforms.Compose:
    """PIL image -> normalised (3, 32, 32) tensor; training adds a random crop (torch's global RNG)."""
    from torchvision import transforms

    augment = [transforms.RandomCrop(32, padding=2)] if train else []
    return transforms.Compose([*augment, transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


class Svhn:
    """SVHN: 73,257 training ("train" split, without "extra") and 26,032 test 32x32 digit images."""

    name = "svhn"

    @attrs.frozen
    class Options:
        root: str = option("data", doc="folder holding train_32x32.mat and test_32x32.mat (relative paths start at the working directory)", validator=non_empty)
        download: bool = option(False, doc="fetch the split's .mat file (about 180 MB train, 64 MB test) into root when it is missing; false never touches the network")

    def __init__(self, options: "Svhn.Options") -> None:
        self.options = options

    def info(self) -> DatasetInfo:
        return DatasetInfo(input_shape=(3, 32, 32), num_classes=len(CLASSES), mean=MEAN, std=STD)

    def image_transform(self) -> Callable[[Any], Any]:
        """One 32x32 image file -> the test split's tensor (``contsup predict``)."""
        return fixed_size_images(svhn_transform(False), 32, "SVHN")

    def files(self, train: bool) -> DataFiles:
        """The one .mat file of the split, with its md5 sum."""
        from torchvision import datasets

        url, name, md5 = datasets.SVHN.split_list["train" if train else "test"]
        root = Path(self.options.root).expanduser()
        return DataFiles(self.name, "SVHN", root, root, ((name, md5),), url)

    def load(self, train: bool) -> datasets.SVHN:
        """The training or test split as (x: (3, 32, 32) float tensor, y: int in 0..9) pairs."""
        from torchvision import datasets

        files = self.files(train)
        split = "train" if train else "test"
        reads = (files.checked[0][0],)
        data = open_dataset(
            files,
            self.options.download,
            lambda: datasets.SVHN(str(files.root), split=split, transform=svhn_transform(train), download=self.options.download),
            reads,
        )
        check_labels(files, data.labels, len(data.data), len(CLASSES), reads)
        return data

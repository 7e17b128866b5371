"""STL-10 through torchvision, with the paper's preprocessing: the 5,000 labelled training and
8,000 test images at 96x96; zero-pad 4, random 96x96 crop and horizontal flip for training;
normalisation to [-1, 1] for both splits.

The number of classes is the length of :data:`CLASSES`, never a recipe key, so a network for
STL-10 always gets a 10-way head.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import attrs

from contsup.options import option
from contsup.types import DatasetInfo
from contsup_datasets.files import DataFiles, check_classes, check_labels, fixed_size_images, non_empty, open_dataset

if TYPE_CHECKING:  # annotations only: torchvision (seconds to import) loads with the files, not with the listing
    from torchvision import datasets, transforms

CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
SIZE = 96


def __getattr__(name: str) -> Any:
    """The module constant CLASS_NAMES_FILE, read from torchvision when first asked for."""
    if name == "CLASS_NAMES_FILE":
        from torchvision import datasets

        return datasets.STL10.class_names_file
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def stl10_transform(train: bool) -> transforms.Compose:
    """PIL image -> normalised (3, 96, 96) tensor; training adds crop and flip (torch's global RNG)."""
    from torchvision import transforms

    augment = [transforms.RandomCrop(SIZE, padding=4), transforms.RandomHorizontalFlip()] if train else []
    return transforms.Compose([*augment, transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


class Stl10:
    """STL-10: 5,000 labelled training and 8,000 test 96x96 colour images in 10 classes."""

    name = "stl10"

    @attrs.frozen
    class Options:
        root: str = option("data", doc="folder holding stl10_binary/ (relative paths start at the working directory)", validator=non_empty)
        download: bool = option(False, doc="fetch and unpack the files (about 2.6 GB, 3.1 GB unpacked) into root when they are missing; false never touches the network")

    def __init__(self, options: "Stl10.Options") -> None:
        self.options = options

    def info(self) -> DatasetInfo:
        return DatasetInfo(input_shape=(3, SIZE, SIZE), num_classes=len(CLASSES), mean=MEAN, std=STD)

    def image_transform(self) -> Callable[[Any], Any]:
        """One 96x96 image file -> the test split's tensor (``contsup predict``)."""
        return fixed_size_images(stl10_transform(False), SIZE, "STL-10")

    def files(self) -> DataFiles:
        """The files torchvision requires (unlabelled images included), with their md5 sums."""
        from torchvision import datasets

        cls = datasets.STL10
        root = Path(self.options.root).expanduser()
        checked = tuple((n, m) for n, m in cls.train_list + cls.test_list)
        return DataFiles(self.name, "STL-10", root, root / cls.base_folder, checked, cls.url)

    def load(self, train: bool) -> datasets.STL10:
        """The labelled training split or the test split as (x: (3, 96, 96) float tensor, y: int) pairs."""
        from torchvision import datasets

        files = self.files()
        split = "train" if train else "test"
        reads = (f"{split}_X.bin", f"{split}_y.bin")
        data = open_dataset(
            files,
            self.options.download,
            lambda: datasets.STL10(str(files.root), split=split, transform=stl10_transform(train), download=self.options.download),
            reads,
        )
        check_labels(files, data.labels, len(data.data), len(CLASSES), reads)
        check_classes(files, getattr(data, "classes", None), CLASSES, datasets.STL10.class_names_file)
        return data

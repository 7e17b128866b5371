"""CIFAR-10 through torchvision, with the paper's preprocessing: reflect-pad 4, random 32x32
crop and horizontal flip for training; per-channel normalisation for both splits."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import attrs

from contsup.options import option
from contsup.types import DatasetInfo
from contsup_datasets.files import DataFiles, check_classes, check_labels, fixed_size_images, non_empty, open_dataset

if TYPE_CHECKING:  # annotations only: torchvision (seconds to import) loads with the files, not with the listing
    from torchvision import datasets, transforms

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)


def _file_names() -> dict[str, Any]:
    """TRAIN_FILES, TEST_FILES and META_FILE: the names of the files torchvision reads."""
    from torchvision import datasets

    cls = datasets.CIFAR10
    return {
        "TRAIN_FILES": tuple(name for name, _ in cls.train_list),
        "TEST_FILES": tuple(name for name, _ in cls.test_list),
        "META_FILE": cls.meta["filename"],
    }


def __getattr__(name: str) -> Any:
    """The module constants TRAIN_FILES, TEST_FILES and META_FILE, read from torchvision when first asked for."""
    if name in ("TRAIN_FILES", "TEST_FILES", "META_FILE"):
        return _file_names()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cifar10_transform(train: bool, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> transforms.Compose:
    """PIL image -> normalised (3, 32, 32) tensor; training adds crop and flip (torch's global RNG)."""
    from torchvision import transforms

    augment = [transforms.RandomCrop(32, padding=4, padding_mode="reflect"), transforms.RandomHorizontalFlip()] if train else []
    return transforms.Compose([*augment, transforms.ToTensor(), transforms.Normalize(mean, std)])


class Cifar10:
    """CIFAR-10: 50,000 training and 10,000 test 32x32 colour images in 10 classes."""

    name = "cifar10"

    @attrs.frozen
    class Options:
        root: str = option("data", doc="folder holding cifar-10-batches-py/ (relative paths start at the working directory)", validator=non_empty)
        download: bool = option(False, doc="fetch the files (about 170 MB) into root when they are missing; false never touches the network")

    def __init__(self, options: "Cifar10.Options") -> None:
        self.options = options

    def info(self) -> DatasetInfo:
        return DatasetInfo(input_shape=(3, 32, 32), num_classes=len(CLASSES), mean=MEAN, std=STD)

    def image_transform(self) -> Callable[[Any], Any]:
        """One 32x32 image file -> the test split's tensor (``contsup predict``)."""
        return fixed_size_images(cifar10_transform(False), 32, "CIFAR-10")

    def files(self) -> DataFiles:
        """The files torchvision requires (both splits and the metadata), with their md5 sums."""
        from torchvision import datasets

        cls = datasets.CIFAR10
        root = Path(self.options.root).expanduser()
        checked = tuple((n, m) for n, m in cls.train_list + cls.test_list) + ((cls.meta["filename"], cls.meta["md5"]),)
        return DataFiles(self.name, "CIFAR-10", root, root / cls.base_folder, checked, cls.url)

    def load(self, train: bool) -> datasets.CIFAR10:
        """The training or test split as (x: (3, 32, 32) float tensor, y: int) pairs."""
        from torchvision import datasets

        files = self.files()
        names = _file_names()
        meta_file = names["META_FILE"]
        reads = names["TRAIN_FILES" if train else "TEST_FILES"] + (meta_file,)
        data = open_dataset(
            files,
            self.options.download,
            lambda: datasets.CIFAR10(str(files.root), train=train, transform=cifar10_transform(train), download=self.options.download),
            reads,
        )
        check_labels(files, data.targets, len(data.data), len(CLASSES), reads)
        check_classes(files, data.classes, CLASSES, meta_file)
        return data

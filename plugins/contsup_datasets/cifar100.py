"""CIFAR-100 through torchvision, with the paper's CIFAR preprocessing (as ``cifar10``):
reflect-pad 4, random 32x32 crop and horizontal flip for training; per-channel normalisation
with CIFAR-100's own mean and standard deviation for both splits. Labels are the 100 fine classes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import attrs

from contsup.options import option
from contsup.types import DatasetInfo
from contsup_datasets.cifar10 import cifar10_transform
from contsup_datasets.files import DataFiles, check_classes, check_labels, fixed_size_images, non_empty, open_dataset

if TYPE_CHECKING:  # annotations only: torchvision (seconds to import) loads with the files, not with the listing
    from torchvision import datasets

# the fine label names, in label order (as batches.meta's fine_label_names lists them)
CLASSES = tuple(
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle "
    "caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant "
    "flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man "
    "maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree "
    "plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail "
    "snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout "
    "tulip turtle wardrobe whale willow_tree wolf woman worm".split()
)
MEAN = (129.3 / 255, 124.1 / 255, 112.4 / 255)
STD = (68.2 / 255, 65.4 / 255, 70.4 / 255)
TRAIN_FILE, TEST_FILE, META_FILE = "train", "test", "meta"


class Cifar100:
    """CIFAR-100: 50,000 training and 10,000 test 32x32 colour images in 100 classes."""

    name = "cifar100"

    @attrs.frozen
    class Options:
        root: str = option("data", doc="folder holding cifar-100-python/ (relative paths start at the working directory)", validator=non_empty)
        download: bool = option(False, doc="fetch the files (about 170 MB) into root when they are missing; false never touches the network")

    def __init__(self, options: "Cifar100.Options") -> None:
        self.options = options

    def info(self) -> DatasetInfo:
        return DatasetInfo(input_shape=(3, 32, 32), num_classes=len(CLASSES), mean=MEAN, std=STD)

    def image_transform(self) -> Callable[[Any], Any]:
        """One 32x32 image file -> the test split's tensor (``contsup predict``)."""
        return fixed_size_images(cifar10_transform(False, MEAN, STD), 32, "CIFAR-100")

    def classes(self) -> tuple[str, ...]:
        """The fine class names in label order; the run directory records them."""
        return CLASSES

    def files(self) -> DataFiles:
        """The files torchvision requires (both splits and the metadata), with their md5 sums."""
        from torchvision import datasets

        cls = datasets.CIFAR100
        root = Path(self.options.root).expanduser()
        checked = tuple((n, m) for n, m in cls.train_list + cls.test_list) + ((cls.meta["filename"], cls.meta["md5"]),)
        return DataFiles(self.name, "CIFAR-100", root, root / cls.base_folder, checked, cls.url)

    def load(self, train: bool) -> datasets.CIFAR100:
        """The training or test split as (x: (3, 32, 32) float tensor, y: int in 0..99) pairs."""
        from torchvision import datasets

        files = self.files()
        reads = (TRAIN_FILE if train else TEST_FILE, META_FILE)
        transform = cifar10_transform(train, MEAN, STD)
        data = open_dataset(
            files,
            self.options.download,
            lambda: datasets.CIFAR100(str(files.root), train=train, transform=transform, download=self.options.download),
            reads,
        )
        check_labels(files, data.targets, len(data.data), len(CLASSES), reads)
        check_classes(files, data.classes, CLASSES, META_FILE)
        return data

"""Built-in datasets: ``digits`` (scikit-learn's bundled digits, the offline default),
``synthetic`` (seeded random images of any shape) and the paper's ``cifar10``, ``svhn`` and
``stl10`` (torchvision, files under ``data.root``), ``cifar100`` likewise, and ``imagefolder``
(your own images in train/ and val/ class folders)."""

from __future__ import annotations

from contsup import hookimpl

from contsup_datasets.cifar10 import Cifar10
from contsup_datasets.cifar100 import Cifar100
from contsup_datasets.digits import Digits
from contsup_datasets.imagefolder import ImageFolder
from contsup_datasets.stl10 import Stl10
from contsup_datasets.svhn import Svhn
from contsup_datasets.synthetic import Synthetic


@hookimpl
def register_datasets(register):
    register(Digits)
    register(Synthetic)
    register(Cifar10)
    register(Cifar100)
    register(Svhn)
    register(Stl10)
    register(ImageFolder)

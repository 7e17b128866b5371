"""Your own images: ``root/train/<class>/*`` and ``root/val/<class>/*`` (the ImageNet layout),
any file PIL reads, classes named and ordered by their folders (sorted).

Transforms come from timm's data pipeline (``timm.data.create_transform``, ImageNet mean and
std); ``augment`` chooses their strength. Every image is converted to RGB, so the network always
sees (3, size, size). Problems with the folder layout are one line each naming the path (exit
status 2); an image that does not decode stops a run with one line naming the file
(:class:`contsup.errors.UnreadableData`), unless ``skip_unreadable`` leaves such files out when
the split is loaded.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import attrs

from contsup.errors import ContsupError, UnreadableData
from contsup.options import at_least, in_range, option
from contsup.types import DatasetInfo
from contsup_datasets.files import non_empty

# timm.data.IMAGENET_DEFAULT_MEAN / _STD (tests/test_imagefolder.py checks they still agree);
# written out so that info() needs neither torch nor timm
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val")
LAYOUT = "expected train/ and val/, each with one sub-folder of images per class"
UNREADABLE_FIX = "replace or delete it, or set data.skip_unreadable = true to leave such files out"

# augment -> (RandomResizedCrop scale, horizontal flip probability, RandAugment, random erasing);
# None: no augmentation, the evaluation transform (resize, centre crop)
AUGMENT = {
    "none": None,
    "light": ((0.35, 1.0), 0.5, None, 0.0),
    "standard": ((0.08, 1.0), 0.5, None, 0.0),  # the ResNet/InfoPro ImageNet recipe: random-resized crop + flip
    "strong": ((0.08, 1.0), 0.5, "rand-m9-mstd0.5-inc1", 0.25),  # + RandAugment and random erasing (DeiT's)
}


@attrs.frozen
class Sample:
    path: str
    label: int


def image_extensions() -> tuple[str, ...]:
    """Every file extension PIL can open (lower case, with the dot), sorted."""
    from PIL import Image

    Image.init()
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))


def _sub_folders(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def class_names(root: Path) -> tuple[str, ...]:
    """The classes (train/'s sub-folders, sorted), once the layout is checked: one line naming
    the path for a missing root, train/ or val/, no class folder, or classes that differ."""
    root = root.expanduser().absolute()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise ContsupError(f"imagefolder: data.root {root} {what}; {LAYOUT}")
    for split in SPLITS:
        if not (root / split).is_dir():
            raise ContsupError(f"imagefolder: {root} has no {split}/ folder; {LAYOUT}")
    train, val = (_sub_folders(root / split) for split in SPLITS)
    if not train:
        raise ContsupError(f"imagefolder: {root / 'train'} holds no class folders; {LAYOUT}")
    if train != val:
        only_train = sorted(set(train) - set(val))
        only_val = sorted(set(val) - set(train))
        parts = [f"only in train/: {', '.join(_few(only_train))}" if only_train else "",
                 f"only in val/: {', '.join(_few(only_val))}" if only_val else ""]
        raise ContsupError(
            f"imagefolder: the class folders of {root / 'train'} and {root / 'val'} differ "
            f"({'; '.join(p for p in parts if p)}); both need the same class sub-folders"
        )
    return tuple(train)


def _few(names: Sequence[str], limit: int = 5) -> list[str]:
    return list(names[:limit]) + ([f"... ({len(names) - limit} more)"] if len(names) > limit else [])


def scan_split(folder: Path, classes: Sequence[str]) -> list[Sample]:
    """Every image file of every class folder, classes in order, files sorted by name; a class
    folder with no image file is one line naming it."""
    extensions = set(image_extensions())
    samples = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        with os.scandir(class_dir) as it:
            files = sorted(
                e.name for e in it
                if not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in extensions and e.is_file()
            )
        if not files:
            raise ContsupError(
                f"imagefolder: {class_dir} holds no images (files PIL reads: .png, .jpg, .jpeg, .webp, ...); "
                f"add some or remove the class from both train/ and val/"
            )
        samples.extend(Sample(str(class_dir / f), label) for f in files)
    return samples


def read_image(path: str) -> Any:
    """The image at ``path`` as an RGB PIL image, or :class:`UnreadableData` naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # decodes the whole file
    except Exception as exc:  # PIL raises OSError, UnidentifiedImageError, SyntaxError, ValueError...
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise UnreadableData(f"imagefolder: {path}: cannot read the image ({why}); {UNREADABLE_FIX}") from None


def _readable(path: str) -> bool:
    try:
        read_image(path)
    except UnreadableData:
        return False
    return True


def drop_unreadable(samples: list[Sample], folder: Path, threads: int = 8) -> list[Sample]:
    """``samples`` without the files that do not decode (each decoded once, on ``threads``
    threads); one warning line counting what was left out."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        ok = list(pool.map(_readable, (s.path for s in samples), chunksize=64))
    bad = [s.path for s, good in zip(samples, ok) if not good]
    if bad:
        print(
            f"warning: imagefolder: skipped {len(bad)} unreadable image{'s' if len(bad) > 1 else ''} of "
            f"{len(samples)} in {folder} (data.skip_unreadable = true; first: {bad[0]})",
            file=sys.stderr, flush=True,
        )
    return [s for s, good in zip(samples, ok) if good]


class FolderImages:
    """A map-style dataset of (x: (3, size, size) float tensor, y: int), read lazily from files."""

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str], transform: Any) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.targets = [s.label for s in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        s = self.samples[i]
        return self.transform(read_image(s.path)), s.label


def folder_transform(train: bool, size: int, augment: str, crop_pct: float, interpolation: str) -> Any:
    """timm's ImageNet transform: PIL image -> normalised (3, size, size) tensor."""
    from timm.data import create_transform

    preset = AUGMENT[augment] if train else None
    if preset is None:
        return create_transform(size, is_training=False, crop_pct=crop_pct, interpolation=interpolation, mean=MEAN, std=STD)
    scale, hflip, auto_augment, re_prob = preset
    return create_transform(
        size, is_training=True, scale=scale, hflip=hflip, color_jitter=None, auto_augment=auto_augment,
        re_prob=re_prob, interpolation=interpolation, mean=MEAN, std=STD,
    )


class ImageFolder:
    """Your own images: root/train/<class>/ and root/val/<class>/ (ImageNet's layout), any format PIL reads."""

    name = "imagefolder"

    @attrs.frozen
    class Options:
        root: str = option(doc="folder holding train/ and val/, each with one sub-folder per class (relative paths start at the working directory)", validator=non_empty)
        size: int = option(224, doc="side of the square images fed to the network (random-resized crop for training, resize and centre crop for evaluation)", validator=at_least(8))
        classes: int = option(0, doc="number of classes; 0: count the class folders of root/train (then validating a recipe needs the folder); set it (e.g. 1000) to plan without the data", validator=at_least(0))
        augment: Literal["none", "light", "standard", "strong"] = option(
            "standard", doc='training augmentation (timm): "none" = the evaluation transform; "light" = random-resized crop '
            '(scale 0.35-1) + flip; "standard" = crop (scale 0.08-1) + flip, the ImageNet ResNet recipe; "strong" = '
            'standard + RandAugment (m9) + random erasing (p 0.25)',
        )
        crop_pct: float = option(0.875, doc="evaluation: resize to size / crop_pct, then centre-crop size", validator=in_range(0.1, 1.0))
        interpolation: Literal["bilinear", "bicubic"] = option("bilinear", doc="resampling filter of resizing and cropping")
        skip_unreadable: bool = option(False, doc="decode every image when a split loads and leave out those that fail, with one warning line counting them; false: an unreadable image stops the run naming the file")

    def __init__(self, options: "ImageFolder.Options") -> None:
        self.options = options

    @property
    def root(self) -> Path:
        return Path(self.options.root).expanduser().absolute()

    def info(self) -> DatasetInfo:
        n = self.options.classes or len(class_names(self.root))
        s = self.options.size
        return DatasetInfo(input_shape=(3, s, s), num_classes=n, mean=MEAN, std=STD)

    def classes(self) -> tuple[str, ...]:
        """The class names in label order (the folders' names, sorted); the run directory records them."""
        names = class_names(self.root)
        n = self.options.classes
        if n and n != len(names):
            raise ContsupError(
                f"imagefolder: data.classes = {n} but {self.root / 'train'} has {len(names)} class folders; "
                f"set data.classes = {len(names)} (or 0 to count them)"
            )
        return names

    def image_transform(self) -> Callable[[Any], Any]:
        """One image file -> the evaluation tensor (``contsup predict``): converted to RGB as the
        training images are, then resized and centre-cropped as the val/ split is."""
        o = self.options
        transform = folder_transform(False, o.size, o.augment, o.crop_pct, o.interpolation)
        return lambda image: transform(image.convert("RGB"))

    def load(self, train: bool) -> FolderImages:
        o = self.options
        names = self.classes()
        folder = self.root / ("train" if train else "val")
        samples = scan_split(folder, names)
        if o.skip_unreadable:
            samples = drop_unreadable(samples, folder)
            scan_split_classes = {s.label for s in samples}
            for label, name in enumerate(names):
                if label not in scan_split_classes:
                    raise ContsupError(f"imagefolder: {folder / name} holds no readable images; replace them or remove the class from both train/ and val/")
        transform = folder_transform(train, o.size, o.augment, o.crop_pct, o.interpolation)
        return FolderImages(samples, names, transform)

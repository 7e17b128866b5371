"""The data files behind the torchvision datasets: a missing, corrupt or unreadable file becomes
a one-line ContsupError that names the exact paths and says how to get good copies."""

from __future__ import annotations

import http.client
import socket
import urllib.error
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import attrs
import numpy as np

from contsup.errors import ContsupError

T = TypeVar("T")

NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, socket.gaierror)

FETCH = "set data.download = true to fetch them (needs internet), or point data.root at a folder holding a copy"
REFETCH = "set data.download = true to fetch {0} again, or point data.root at a good copy"


def non_empty(_instance: Any, _attribute: Any, value: str) -> None:
    """Validator: a path option may not be the empty string."""
    if not value.strip():
        raise ValueError('must name a folder, e.g. "data"')


@attrs.frozen
class DataFiles:
    """Where one dataset's files live and the md5 sums torchvision checks them against."""

    dataset: str  # recipe name, e.g. "cifar10"
    title: str  # e.g. "CIFAR-10"
    root: Path  # data.root as given
    folder: Path  # the folder holding the files (root itself, or a sub-folder of it)
    checked: tuple[tuple[str, str], ...]  # (file name in folder, md5) for every file torchvision requires
    url: str  # where download = true fetches them from

    def path(self, name: str) -> Path:
        """The absolute path of file ``name``."""
        return (self.folder / name).absolute()

    def require(self) -> None:
        """Raise one line naming what is missing, before torchvision gets a chance to say less."""
        missing = [name for name, _ in self.checked if not self.path(name).is_file()]
        if not missing:
            return
        folder = self.folder.absolute()
        if len(missing) == len(self.checked):
            names = ", ".join(missing)
            raise ContsupError(f"{self.dataset}: no {self.title} files in {folder} (expected {names}); {FETCH}")
        paths = ", ".join(str(self.path(name)) for name in missing)
        raise ContsupError(f"{self.dataset}: {paths} not found (the other {self.title} files are there); {FETCH}")

    def failing_checksum(self) -> list[Path]:
        """The files whose md5 sum is not the published one (empty when all are good)."""
        from torchvision.datasets.utils import check_integrity

        return [self.path(name) for name, md5 in self.checked if not check_integrity(str(self.path(name)), md5)]

    def corrupt(self, paths: Iterable[Path], why: str) -> ContsupError:
        """One line: these files are damaged (``why``), and how to replace them."""
        paths = [str(p) for p in paths]
        them = "it" if len(paths) == 1 else "them"
        return ContsupError(f"{self.dataset}: {', '.join(paths)}: {why}; delete {them} and {REFETCH.format(them)}")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def open_dataset(files: DataFiles, download: bool, build: Callable[[], T], reads: Sequence[str]) -> T:
    """``build()`` (a torchvision dataset constructor), with every data problem as one line.

    Without ``download`` the files are checked first, so torchvision never touches the network.
    ``reads`` are the file names this split parses, named when parsing fails.
    """
    if not download:
        files.require()
    try:
        return build()
    except ContsupError:
        raise
    except ImportError as exc:
        raise ContsupError(f"{files.dataset}: reading {files.title} needs the Python package '{exc.name}': pip install {exc.name}") from None
    except NETWORK_ERRORS as exc:
        raise ContsupError(
            f"{files.dataset}: downloading {files.url} into {files.root.absolute()} failed ({_one_line(exc)}); "
            f"check the connection, or fetch it on another machine and point data.root at the copy"
        ) from None
    except MemoryError:
        raise
    except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted": a checksum failed
        bad = files.failing_checksum()
        if bad:
            raise files.corrupt(bad, "wrong md5 sum (corrupt or partly downloaded)") from None
        raise files.corrupt((files.path(n) for n in reads), f"cannot be read ({_one_line(exc)})") from None
    except Exception as exc:  # unpickling, .mat or .bin parsing, or reading the file failed
        raise files.corrupt((files.path(n) for n in reads), f"cannot be read ({_one_line(exc)})") from None


def check_labels(files: DataFiles, labels: Any, size: int, num_classes: int, reads: Sequence[str]) -> None:
    """Every image has a label in 0..num_classes-1, else one line naming the split's files."""
    labels = np.asarray(labels)
    paths = [files.path(n) for n in reads]
    if len(labels) != size:
        raise files.corrupt(paths, f"{size} images but {len(labels)} labels")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        found = ", ".join(str(int(v)) for v in np.unique(bad)[:5])
        raise files.corrupt(paths, f"labels outside 0..{num_classes - 1} (found {found})")


def check_classes(files: DataFiles, found: Sequence[str] | None, expected: Sequence[str], source: str) -> None:
    """The class names shipped with the data (when present) are the dataset's own, in order."""
    if found is not None and list(found) != list(expected):
        raise files.corrupt(
            [files.path(source)], f"class names {list(found)} are not the {len(expected)} {files.title} classes {list(expected)}"
        )


def fixed_size_images(transform: Callable[[Any], Any], size: int, title: str) -> Callable[[Any], Any]:
    """The evaluation transform of one image file for a dataset of ``size`` x ``size`` colour
    images (``contsup predict``): any mode PIL reads becomes RGB, as the dataset's own images
    are; an image of another size is refused (ValueError), since the network never saw one."""

    def apply(image: Any) -> Any:
        if tuple(image.size) != (size, size):
            width, height = image.size
            raise ValueError(f"{width}x{height} pixels; {title} networks take {size}x{size} images (resize them first)")
        return transform(image.convert("RGB"))

    return apply

"""cifar10, svhn and stl10: torchvision's real loaders on tiny files written here in the real
formats (only the md5 check is patched), the paper's preprocessing, and one-line errors for
missing, corrupt and unreadable files."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import socket
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.datasets.cifar
import torchvision.datasets.stl10
import torchvision.datasets.svhn
from torch.utils.data import DataLoader

from contsup.cli import main
from contsup.errors import ContsupError, RecipeError
from contsup.model.network import build_network
from contsup.config.recipe import loads_recipe
from contsup_datasets import Cifar10, Cifar100, Stl10, Svhn
from contsup_datasets import cifar10 as cifar10_module
from contsup_datasets import stl10 as stl10_module

CIFAR_PER_BATCH, CIFAR_TEST = 4, 6
SVHN_TRAIN, SVHN_TEST = 12, 5
STL_TRAIN, STL_TEST = 6, 4


# -- tiny data files in the real formats -------------------------------------------------------


def write_cifar(root: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """cifar-10-batches-py/: five training pickles, the test pickle and batches.meta.
    Returns {file: (images (N, 3, 32, 32) uint8, labels)}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = CIFAR_TEST if name == "test_batch" else CIFAR_PER_BATCH
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        entry = {"batch_label": name, "labels": labels, "data": images.reshape(n, 3072), "filenames": [f"{name}_{i}.png" for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        written[name] = (images, labels)
    meta = {"num_cases_per_batch": CIFAR_PER_BATCH, "label_names": list(cifar10_module.CLASSES), "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def write_svhn(root: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train_32x32.mat and test_32x32.mat: X (32, 32, 3, N) uint8 and y (N, 1) with digit 0 as 10.
    Returns {split: (images (N, 3, 32, 32) uint8, y as in the file)}."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in (("train", SVHN_TRAIN), ("test", SVHN_TEST)):
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        y = np.arange(1, n + 1, dtype=np.uint8) % 10 + 1  # 1..10, every label at least once in train
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": y.reshape(n, 1)})
        written[split] = (images, y)
    return written


def write_stl(root: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """stl10_binary/: {train,test}_{X,y}.bin, unlabeled_X.bin and class_names.txt as published
    (images column-major, labels 1..10). Returns {split: (images (N, 3, 96, 96) uint8, labels 0..9)}."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in (("train", STL_TRAIN), ("test", STL_TEST), ("unlabeled", 1)):
        images = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())
        labels = np.arange(n, dtype=np.uint8) % 10
        if split != "unlabeled":
            (folder / f"{split}_y.bin").write_bytes((labels + 1).tobytes())
        written[split] = (images, labels)
    (folder / "class_names.txt").write_text("\n".join(stl10_module.CLASSES) + "\n")
    return written


@pytest.fixture
def skip_md5(monkeypatch):
    """The tiny files cannot match the published md5 sums: check only that each file exists."""
    for module in (torchvision.datasets.cifar, torchvision.datasets.svhn, torchvision.datasets.stl10):
        monkeypatch.setattr(module, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.fixture
def no_network(monkeypatch):
    """Every way out to the network is recorded and refused; returns the list of attempts."""
    attempts: list[str] = []

    def refuse(what):
        def call(*args, **kwargs):
            attempts.append(f"{what}{args[:1]}")
            raise urllib.error.URLError("the network is off in tests")

        return call

    monkeypatch.setattr(urllib.request, "urlopen", refuse("urlopen"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    return attempts


def cifar(root: Path, **kw) -> Cifar10:
    return Cifar10(Cifar10.Options(root=str(root), **kw))


def svhn(root: Path, **kw) -> Svhn:
    return Svhn(Svhn.Options(root=str(root), **kw))


def stl(root: Path, **kw) -> Stl10:
    return Stl10(Stl10.Options(root=str(root), **kw))


def normalised(images: np.ndarray, mean, std) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> what ToTensor + Normalize give, computed independently."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def window(out: torch.Tensor, image: np.ndarray, pad: int, mode: str, flips: bool, mean, std) -> tuple[int, int, bool] | None:
    """The (top, left, flipped) crop of ``image`` (3, H, W) padded by ``pad`` (numpy ``mode``)
    that equals ``out`` (3, H, W), or None when no crop does."""
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode=mode)
    full = normalised(padded[None], mean, std)[0]
    h, w = image.shape[1:]
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            crop = full[:, top : top + h, left : left + w]
            for flipped in (False, True) if flips else (False,):
                candidate = crop.flip(-1) if flipped else crop
                if torch.allclose(candidate, out, atol=1e-5):
                    return top, left, flipped
    return None


# -- info: shapes, classes and normalisation without touching the disk --------------------------


def test_info_reads_no_file(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("info() touched the disk")

    for module, name in ((os, "stat"), (os, "lstat"), (os, "scandir"), (os, "listdir"), (os, "open"), (builtins, "open"), (io, "open")):
        monkeypatch.setattr(module, name, refuse)
    infos = {cls.name: cls(cls.Options(root=str(tmp_path / "nowhere"))).info() for cls in (Cifar10, Svhn, Stl10)}
    assert infos["cifar10"].input_shape == (3, 32, 32) and infos["svhn"].input_shape == (3, 32, 32)
    assert infos["stl10"].input_shape == (3, 96, 96)
    assert all(i.num_classes == 10 for i in infos.values())
    assert infos["cifar10"].mean == pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255))
    assert infos["cifar10"].std == pytest.approx((63.0 / 255, 62.1 / 255, 66.7 / 255))
    assert infos["svhn"].mean == infos["stl10"].mean == (0.5,) * 3 and infos["svhn"].std == infos["stl10"].std == (0.5,) * 3


def test_stl10_classes_come_from_its_metadata_not_from_a_recipe(registries):
    assert Stl10(Stl10.Options()).info().num_classes == len(stl10_module.CLASSES) == 10
    assert len(set(stl10_module.CLASSES)) == 10
    assert {f.name for f in Stl10.Options.__attrs_attrs__} == {"root", "download"}
    text = '[data]\nuse = "stl10"\n{extra}\n[backbone]\nuse = "cifar_resnet20"\n[partition]\nmodules = 2\n'
    with pytest.raises(RecipeError, match=r"data\.num_classes: unknown key"):
        loads_recipe(text.format(extra="num_classes = 100"), registries, source="stl.toml")
    recipe = loads_recipe(text.format(extra=""), registries, source="stl.toml")
    network = build_network(recipe).network.eval()
    with torch.no_grad():
        assert network(torch.randn(1, 3, 96, 96)).shape == (1, 10)


def test_root_may_not_be_empty(registries):
    with pytest.raises(RecipeError, match=r"data\.root: must name a folder"):
        loads_recipe('[data]\nuse = "cifar10"\nroot = " "\n[backbone]\nuse = "cifar_resnet20"\n', registries, source="r.toml")


# -- CIFAR-10 ------------------------------------------------------------------------------------


def test_cifar10_loads_the_real_format_normalised(tmp_path, skip_md5):
    written = write_cifar(tmp_path)
    d = cifar(tmp_path)
    train, test = d.load(train=True), d.load(train=False)
    assert len(train) == 5 * CIFAR_PER_BATCH and len(test) == CIFAR_TEST
    images, labels = written["test_batch"]
    for i in range(CIFAR_TEST):
        x, y = test[i]
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
        assert isinstance(y, int) and y == labels[i]
        assert torch.allclose(x, normalised(images[i : i + 1], cifar10_module.MEAN, cifar10_module.STD)[0], atol=1e-5)
    train_labels = [y for name in (f"data_batch_{i}" for i in range(1, 6)) for y in written[name][1]]
    assert [train[i][1] for i in range(len(train))] == train_labels


def test_cifar10_known_pixel_values(tmp_path, skip_md5):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    entry = pickle.loads(path.read_bytes())
    entry["data"][0, :] = 255  # image 0 all white ...
    entry["data"][1, :] = 0  # ... image 1 all black
    path.write_bytes(pickle.dumps(entry, protocol=2))
    test = cifar(tmp_path).load(train=False)
    white, black = test[0][0], test[1][0]
    for c, (m, s) in enumerate(zip((125.3, 123.0, 113.9), (63.0, 62.1, 66.7))):
        assert torch.allclose(white[c], torch.full((32, 32), (255 - m) / s), atol=1e-5)
        assert torch.allclose(black[c], torch.full((32, 32), -m / s), atol=1e-5)


def test_cifar10_train_is_reflect_pad_4_crop_and_flip(tmp_path, skip_md5):
    written = write_cifar(tmp_path)
    train = cifar(tmp_path).load(train=True)
    images = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    torch.manual_seed(0)
    seen = [window(train[i][0], images[i], 4, "reflect", True, cifar10_module.MEAN, cifar10_module.STD) for i in range(len(train))]
    assert None not in seen  # every output is a crop of the reflect-padded image, maybe flipped
    assert any(flipped for _, _, flipped in seen) and not all(flipped for _, _, flipped in seen)
    assert any((top, left) != (4, 4) for top, left, _ in seen)  # the crop moves
    plain = normalised(images, cifar10_module.MEAN, cifar10_module.STD)
    assert any(not torch.equal(train[i][0], plain[i]) for i in range(len(train)))


def test_augmentation_follows_torch_seed(tmp_path, skip_md5):
    write_cifar(tmp_path)

    def batch(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        loader = DataLoader(cifar(tmp_path).load(train=True), batch_size=8, shuffle=False)
        return next(iter(loader))[0]

    assert torch.equal(batch(7), batch(7))
    assert not torch.equal(batch(7), batch(8))


# -- SVHN ----------------------------------------------------------------------------------------


def test_svhn_loads_the_real_format_with_label_10_as_0(tmp_path, skip_md5):
    written = write_svhn(tmp_path)
    d = svhn(tmp_path)
    train, test = d.load(train=True), d.load(train=False)
    assert len(train) == SVHN_TRAIN and len(test) == SVHN_TEST
    file_y = written["train"][1]
    assert 10 in file_y.tolist()
    labels = [train[i][1] for i in range(SVHN_TRAIN)]
    assert labels == [0 if v == 10 else int(v) for v in file_y] and sorted(set(labels)) == list(range(10))
    images = written["test"][0]
    for i in range(SVHN_TEST):
        x, y = test[i]
        assert x.shape == (3, 32, 32) and 0 <= y < 10
        assert torch.allclose(x, normalised(images[i : i + 1], (0.5,) * 3, (0.5,) * 3)[0], atol=1e-5)
    assert float(test[0][0].min()) >= -1.0 and float(test[0][0].max()) <= 1.0


def test_svhn_train_is_zero_pad_2_and_crop_without_flip(tmp_path, skip_md5):
    images = write_svhn(tmp_path)["train"][0]
    train = svhn(tmp_path).load(train=True)
    torch.manual_seed(0)
    seen = [window(train[i][0], images[i], 2, "constant", False, (0.5,) * 3, (0.5,) * 3) for i in range(SVHN_TRAIN)]
    assert None not in seen  # never flipped: every output is an unflipped crop of the zero-padded image
    assert any((top, left) != (2, 2) for top, left, _ in seen)


# -- STL-10 --------------------------------------------------------------------------------------


def test_stl10_loads_the_real_binary_format(tmp_path, skip_md5):
    written = write_stl(tmp_path)
    d = stl(tmp_path)
    train, test = d.load(train=True), d.load(train=False)
    assert len(train) == STL_TRAIN and len(test) == STL_TEST  # the labelled split only
    images, labels = written["test"]
    for i in range(STL_TEST):
        x, y = test[i]
        assert x.shape == (3, 96, 96) and y == int(labels[i])
        assert torch.allclose(x, normalised(images[i : i + 1], (0.5,) * 3, (0.5,) * 3)[0], atol=1e-5)
    assert [train[i][1] for i in range(STL_TRAIN)] == written["train"][1].tolist()


def test_stl10_train_is_pad_4_crop_96_and_flip(tmp_path, skip_md5):
    images = write_stl(tmp_path)["train"][0]
    train = stl(tmp_path).load(train=True)
    torch.manual_seed(1)
    seen = [window(train[i % STL_TRAIN][0], images[i % STL_TRAIN], 4, "constant", True, (0.5,) * 3, (0.5,) * 3) for i in range(12)]
    assert None not in seen
    assert any(flipped for _, _, flipped in seen) and any((top, left) != (4, 4) for top, left, _ in seen)


# -- missing files -------------------------------------------------------------------------------


def test_missing_folder_is_one_line_naming_it(tmp_path, no_network):
    for d, folder in ((cifar(tmp_path), tmp_path / "cifar-10-batches-py"), (stl(tmp_path), tmp_path / "stl10_binary"), (svhn(tmp_path), tmp_path)):
        with pytest.raises(ContsupError) as exc:
            d.load(train=True)
        (line,) = exc.value.lines
        assert line.startswith(f"{d.name}: no ") and f"files in {folder} (expected " in line
        assert "set data.download = true" in line and "point data.root at" in line
    assert no_network == []


def test_missing_file_is_named_by_its_exact_path(tmp_path, skip_md5, no_network):
    write_cifar(tmp_path / "c")
    (tmp_path / "c" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ContsupError) as exc:
        cifar(tmp_path / "c").load(train=False)  # torchvision wants both splits' files for either
    (line,) = exc.value.lines
    assert line.startswith(f"cifar10: {tmp_path / 'c' / 'cifar-10-batches-py' / 'data_batch_3'} not found")
    write_svhn(tmp_path / "s")
    (tmp_path / "s" / "test_32x32.mat").unlink()
    assert len(svhn(tmp_path / "s").load(train=True)) == SVHN_TRAIN  # each split needs only its file
    with pytest.raises(ContsupError, match=f"^svhn: no SVHN files in {tmp_path / 's'} \\(expected test_32x32.mat\\)"):
        svhn(tmp_path / "s").load(train=False)
    write_stl(tmp_path / "t")
    (tmp_path / "t" / "stl10_binary" / "unlabeled_X.bin").unlink()
    with pytest.raises(ContsupError, match=f"^stl10: {tmp_path / 't' / 'stl10_binary' / 'unlabeled_X.bin'} not found"):
        stl(tmp_path / "t").load(train=True)
    assert no_network == []


def test_relative_root_is_reported_as_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ContsupError, match=f"no CIFAR-10 files in {tmp_path / 'data' / 'cifar-10-batches-py'} "):
        Cifar10(Cifar10.Options()).load(train=True)


def test_download_false_never_touches_the_network(tmp_path, skip_md5, no_network):
    write_cifar(tmp_path)
    write_svhn(tmp_path)
    write_stl(tmp_path)
    for cls in (Cifar10, Svhn, Stl10):
        for train in (True, False):
            assert len(cls(cls.Options(root=str(tmp_path), download=False)).load(train=train)) > 0
    with pytest.raises(ContsupError):
        cifar(tmp_path / "empty").load(train=True)
    assert no_network == []


def test_a_failed_download_is_one_line(tmp_path, no_network):
    with pytest.raises(ContsupError) as exc:
        cifar(tmp_path, download=True).load(train=True)
    (line,) = exc.value.lines
    assert line.startswith(f"cifar10: downloading {torchvision.datasets.CIFAR10.url} into {tmp_path} failed (URLError")
    assert no_network  # it did try, and the fixture refused


# -- corrupt files -------------------------------------------------------------------------------


def test_checksum_mismatch_names_the_files(tmp_path):
    write_cifar(tmp_path)  # real md5 check: these tiny files cannot match the published sums
    with pytest.raises(ContsupError) as exc:
        cifar(tmp_path).load(train=True)
    (line,) = exc.value.lines
    folder = tmp_path / "cifar-10-batches-py"
    assert line.startswith(f"cifar10: {folder / 'data_batch_1'}, {folder / 'data_batch_2'}")
    assert line.count(str(folder)) == 7 and f"{folder / 'batches.meta'}: wrong md5 sum" in line
    assert "; delete them and set data.download = true to fetch them again, or point data.root at a good copy" in line
    write_svhn(tmp_path)
    with pytest.raises(ContsupError, match=f"^svhn: {tmp_path / 'test_32x32.mat'}: wrong md5 sum .*; delete it and set"):
        svhn(tmp_path).load(train=False)


def test_unreadable_files_are_one_line(tmp_path, skip_md5):
    write_cifar(tmp_path / "c")
    (tmp_path / "c" / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(ContsupError) as exc:
        cifar(tmp_path / "c").load(train=True)
    (line,) = exc.value.lines
    assert str(tmp_path / "c" / "cifar-10-batches-py" / "data_batch_2") in line and "batches.meta: cannot be read (Unpickling" in line
    assert "; delete them and set data.download = true" in line
    assert len(cifar(tmp_path / "c").load(train=False)) == CIFAR_TEST  # the test split does not read it

    write_svhn(tmp_path / "s")
    (tmp_path / "s" / "train_32x32.mat").write_bytes(b"\x00" * 200)
    with pytest.raises(ContsupError, match=f"^svhn: {tmp_path / 's' / 'train_32x32.mat'}: cannot be read \\("):
        svhn(tmp_path / "s").load(train=True)

    write_stl(tmp_path / "t")
    folder = tmp_path / "t" / "stl10_binary"
    with open(folder / "train_X.bin", "ab") as f:
        f.write(b"\x01\x02\x03")  # no longer a whole number of 96x96 images
    with pytest.raises(ContsupError, match=f"^stl10: {folder / 'train_X.bin'}, {folder / 'train_y.bin'}: cannot be read \\(ValueError"):
        stl(tmp_path / "t").load(train=True)


def test_inconsistent_labels_and_classes_are_one_line(tmp_path, skip_md5):
    write_stl(tmp_path)
    folder = tmp_path / "stl10_binary"
    (folder / "test_y.bin").write_bytes(bytes([1, 2, 3]))  # 4 images, 3 labels
    with pytest.raises(ContsupError, match=r"^stl10: .*test_X\.bin, .*test_y\.bin: 4 images but 3 labels; delete them"):
        stl(tmp_path).load(train=False)
    (folder / "test_y.bin").write_bytes(bytes([1, 0, 3, 11]))  # 0 and 11 are not STL-10 labels (1..10)
    with pytest.raises(ContsupError, match=r"test_y\.bin: labels outside 0\.\.9 \(found 10, 255\)"):
        stl(tmp_path).load(train=False)
    (folder / "class_names.txt").write_text("\n".join(f"class{i}" for i in range(100)))
    with pytest.raises(ContsupError, match=r"class_names\.txt: class names \['class0'.* are not the 10 STL-10 classes \['airplane'.*; delete it and"):
        stl(tmp_path).load(train=True)

    write_cifar(tmp_path)
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(pickle.dumps({"label_names": ["a", "b"]}, protocol=2))
    with pytest.raises(ContsupError, match=r"batches\.meta: class names \['a', 'b'\] are not the 10 CIFAR-10 classes"):
        cifar(tmp_path).load(train=False)


# -- through the command line --------------------------------------------------------------------

CLI_RECIPE = """
[run]
epochs = 1
out_dir = "{out_dir}"

[data]
use = "cifar10"
root = "{root}"
batch_size = 8

[backbone]
use = "cifar_resnet20"

[partition]
modules = 2

[context]
use = "R1E"
"""


def test_train_without_the_files_exits_2_with_one_line(write_recipe, tmp_path, capsys, no_network):
    root = tmp_path / "empty"
    path = write_recipe(CLI_RECIPE.format(out_dir=tmp_path / "run", root=root))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: cifar10: no CIFAR-10 files in {root / 'cifar-10-batches-py'} (expected data_batch_1, ")
    assert no_network == []
    assert not (tmp_path / "run").exists()  # nothing left behind: the same command works once the data is there
    assert main(["train", str(path)]) == 2 and "no CIFAR-10 files" in capsys.readouterr().err


def test_train_runs_on_the_real_loader(write_recipe, tmp_path, capsys, skip_md5):
    write_cifar(tmp_path / "data")
    path = write_recipe(CLI_RECIPE.format(out_dir=tmp_path / "run", root=tmp_path / "data"))
    assert main(["train", str(path)]) == 0
    assert "final test error:" in capsys.readouterr().out


def test_every_dataset_is_in_the_datasets_doc(registries):
    from conftest import ROOT

    text = (ROOT / "docs" / "datasets.md").read_text()
    for name in registries.datasets.names():
        assert f"| `{name}` |" in text, f"docs/datasets.md does not describe dataset '{name}'"


def test_the_stl10_k4_recipe_trains_a_step_on_fake_files(tmp_path, capsys, skip_md5, monkeypatch):
    """recipes/stl10_k4.toml as shipped (ResNet-110, K=4, R1E, supcon) on tiny STL-10 files: one
    training step, one evaluation, a finished run directory."""
    from conftest import ROOT

    monkeypatch.setitem(globals(), "STL_TRAIN", 12)  # labels 0..9, 0, 1: supcon needs positive pairs
    write_stl(tmp_path / "data")
    out_dir = tmp_path / "run"
    args = ["train", str(ROOT / "recipes" / "stl10_k4.toml"), "--set", f"data.root={tmp_path / 'data'}"]
    for override in ("run.epochs=1", "data.batch_size=12", "data.workers=0", "schedule.warmup_epochs=0", f"run.out_dir={out_dir}"):
        args += ["--set", override]
    assert main(args) == 0, capsys.readouterr().err
    metrics = (out_dir / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 1 and '"step": 1' in metrics[0]


# -- CIFAR-100 -----------------------------------------------------------------------------------

CIFAR100_TRAIN, CIFAR100_TEST = 10, 6


def write_cifar100(root: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """cifar-100-python/: the train and test pickles (fine and coarse labels) and meta, as
    published. Returns {file: (images (N, 3, 32, 32) uint8, fine labels)}."""
    from contsup_datasets import cifar100 as cifar100_module

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name, n in (("train", CIFAR100_TRAIN), ("test", CIFAR100_TEST)):
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        entry = {
            "filenames": [f"{name}_{i}.png" for i in range(n)], "batch_label": f"{name} batch",
            "fine_labels": fine, "coarse_labels": [v // 5 for v in fine], "data": images.reshape(n, 3072),
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        written[name] = (images, fine)
    meta = {"fine_label_names": list(cifar100_module.CLASSES), "coarse_label_names": [f"super{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def test_cifar100_loads_the_real_format_with_the_paper_cifar_preprocessing(tmp_path, skip_md5):
    from contsup_datasets import Cifar100
    from contsup_datasets import cifar100 as cifar100_module

    written = write_cifar100(tmp_path)
    d = Cifar100(Cifar100.Options(root=str(tmp_path)))
    assert d.info().num_classes == 100 and d.info().input_shape == (3, 32, 32)
    train, test = d.load(train=True), d.load(train=False)
    assert len(train) == CIFAR100_TRAIN and len(test) == CIFAR100_TEST
    images, labels = written["test"]
    for i in range(CIFAR100_TEST):
        x, y = test[i]
        assert y == labels[i]  # the fine labels
        assert torch.allclose(x, normalised(images[i : i + 1], cifar100_module.MEAN, cifar100_module.STD)[0], atol=1e-5)
    torch.manual_seed(0)
    images = written["train"][0]
    seen = [window(train[i][0], images[i], 4, "reflect", True, cifar100_module.MEAN, cifar100_module.STD) for i in range(len(train))]
    assert None not in seen and any(f for _, _, f in seen) and any((t, l) != (4, 4) for t, l, _ in seen)


def test_cifar100_missing_files_and_bad_sums_are_one_line(tmp_path):
    from contsup_datasets import Cifar100

    with pytest.raises(ContsupError) as info:
        Cifar100(Cifar100.Options(root=str(tmp_path / "none"))).load(train=True)
    assert str(info.value).startswith(f"cifar100: no CIFAR-100 files in {tmp_path / 'none' / 'cifar-100-python'}")
    write_cifar100(tmp_path)  # real md5 check: these tiny files cannot match the published sums
    with pytest.raises(ContsupError) as info:
        Cifar100(Cifar100.Options(root=str(tmp_path))).load(train=False)
    assert "\n" not in str(info.value) and "wrong md5 sum" in str(info.value)
    assert str(tmp_path / "cifar-100-python" / "train") in str(info.value)

"""The imagefolder dataset on a real image folder: PNG files written with PIL from scikit-learn's
digits. It trains, records its classes, and every problem with the folder is one line naming
the path (exit 2); an image that does not decode stops a run naming the file (exit 1, with a
checkpoint), or is skipped and counted with data.skip_unreadable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contsup.cli import main

CLASSES = ("eight", "five", "one")  # folder names: sorted, so labels 0, 1, 2 in this order
DIGIT = {"eight": 8, "five": 5, "one": 1}


def make_folder(root: Path, train: int = 8, val: int = 4, size: int = 16) -> Path:
    """root/{train,val}/<class>/*.png from the real digits, upsampled to ``size``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for name in CLASSES:
        images = digits.images[digits.target == DIGIT[name]][: train + val]
        for i, img in enumerate(images):
            split = "train" if i < train else "val"
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            pil = Image.fromarray((img * 255 / 16).astype(np.uint8), mode="L").resize((size, size), Image.BILINEAR)
            pil.save(folder / f"{i:04d}.png")
    return root


RECIPE = """
[run]
epochs = {epochs}
out_dir = "{out}"

[data]
use = "imagefolder"
root = "{root}"
size = 16
augment = "light"
batch_size = 8
{extra}

[backbone]
use = "cifar_resnet20"

[partition]
modules = 2

[context]
use = "R1E"

[optimizer]
lr = 0.05
"""


def recipe(tmp_path: Path, root: Path, extra: str = "", epochs: int = 1) -> Path:
    path = tmp_path / "folder.toml"
    path.write_text(RECIPE.format(root=root, out=tmp_path / "run", extra=extra, epochs=epochs))
    return path


def run(args, capsys) -> tuple[int, list[str]]:
    code = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, [line for line in err.splitlines() if line.startswith(("error:", "warning:"))]


def test_an_image_folder_trains_one_epoch_and_records_its_classes(tmp_path, capsys):
    root = make_folder(tmp_path / "images")
    code, lines = run(["train", str(recipe(tmp_path, root))], capsys)
    assert code == 0, lines
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "classes.json").read_text()) == list(CLASSES)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and 0 <= metrics[0]["test_error_pct"] <= 100
    assert (run_dir / "model.pt").is_file()


def test_the_dataset_gives_rgb_tensors_labelled_by_sorted_folder_names(tmp_path, registries):
    from contsup.config.recipe import load_recipe

    root = make_folder(tmp_path / "images")
    r = load_recipe(recipe(tmp_path, root), (), registries)
    ds = r.dataset.create()
    info = ds.info()
    assert info.input_shape == (3, 16, 16) and info.num_classes == 3
    train, val = ds.load(train=True), ds.load(train=False)
    assert len(train) == 24 and len(val) == 12
    assert train.classes == list(CLASSES)
    x, y = val[0]
    assert tuple(x.shape) == (3, 16, 16) and y == 0
    assert Path(val.samples[0].path).parent.name == "eight"
    assert sorted(set(train.targets)) == [0, 1, 2]


def test_the_normalisation_is_timms_imagenet_default():
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from contsup_datasets.imagefolder import MEAN, STD

    assert MEAN == tuple(IMAGENET_DEFAULT_MEAN) and STD == tuple(IMAGENET_DEFAULT_STD)


def test_every_augment_level_builds(tmp_path, registries):
    from contsup_datasets.imagefolder import AUGMENT, folder_transform

    img = Image.new("RGB", (20, 20), (10, 200, 30))
    for level in AUGMENT:
        x = folder_transform(True, 16, level, 0.875, "bilinear")(img)
        assert tuple(x.shape) == (3, 16, 16)


def layout_problem(tmp_path: Path, root: Path, capsys, command: str = "train") -> str:
    code, lines = run([command, str(recipe(tmp_path, root))], capsys)
    assert code == 2, lines
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, lines
    return errors[0]


def test_a_missing_root_is_one_line_naming_it(tmp_path, capsys):
    root = tmp_path / "nowhere"
    line = layout_problem(tmp_path, root, capsys)
    assert str(root) in line and "does not exist" in line
    assert str(root) in layout_problem(tmp_path, root, capsys, "validate")
    assert not (tmp_path / "run").exists()  # nothing half-made is left behind


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_missing_split_folder_is_one_line_naming_the_root(tmp_path, capsys, split):
    import shutil

    root = make_folder(tmp_path / "images", train=2, val=1)
    shutil.rmtree(root / split)
    line = layout_problem(tmp_path, root, capsys)
    assert f"{root} has no {split}/ folder" in line


def test_a_class_folder_without_images_is_one_line_naming_it(tmp_path, capsys):
    root = make_folder(tmp_path / "images", train=2, val=1)
    for f in (root / "val" / "five").iterdir():
        f.unlink()
    (root / "val" / "five" / "notes.txt").write_text("not an image")
    line = layout_problem(tmp_path, root, capsys)
    assert str(root / "val" / "five") in line and "holds no images" in line


def test_class_folders_that_differ_between_train_and_val_are_one_line(tmp_path, capsys):
    root = make_folder(tmp_path / "images", train=2, val=1)
    (root / "val" / "one").rename(root / "val" / "seven")
    line = layout_problem(tmp_path, root, capsys)
    assert str(root / "train") in line and str(root / "val") in line
    assert "only in train/: one" in line and "only in val/: seven" in line


def test_a_class_count_that_disagrees_with_the_folders_is_one_line(tmp_path, capsys):
    root = make_folder(tmp_path / "images", train=2, val=1)
    path = recipe(tmp_path, root, extra="classes = 5")
    code, lines = run(["train", str(path)], capsys)
    assert code == 2 and len(lines) == 1
    assert "data.classes = 5" in lines[0] and str(root / "train") in lines[0]


def corrupt(root: Path) -> Path:
    bad = root / "train" / "five" / "0003.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    return bad


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_stops_the_run_naming_the_file_with_a_checkpoint(tmp_path, capsys, workers):
    root = make_folder(tmp_path / "images")
    bad = corrupt(root)
    code, lines = run(["train", str(recipe(tmp_path, root, extra=f"workers = {workers}"))], capsys)
    assert code == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: imagefolder: {bad}: cannot read the image")
    assert "data.skip_unreadable = true" in lines[0] and "saved checkpoint" in lines[0]
    assert "contsup train --resume" in lines[0]
    assert list((tmp_path / "run" / "checkpoints").iterdir())
    # once the file is replaced, the run resumes from where it stopped
    Image.new("L", (16, 16), 128).save(bad)
    code, lines = run(["train", "--resume", str(tmp_path / "run")], capsys)
    assert code == 0, lines
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_skip_unreadable_leaves_corrupt_images_out_with_one_warning(tmp_path, capsys, registries):
    root = make_folder(tmp_path / "images")
    bad = corrupt(root)
    code, lines = run(["train", str(recipe(tmp_path, root, extra="skip_unreadable = true"))], capsys)
    assert code == 0, lines
    warnings = [line for line in lines if line.startswith("warning:")]
    assert warnings == [
        f"warning: imagefolder: skipped 1 unreadable image of 24 in {root / 'train'} "
        f"(data.skip_unreadable = true; first: {bad})"
    ]


def test_the_notebook_example_trains_the_shipped_folder_recipe_through_the_api(tmp_path):
    """docs/datasets.md's notebook example, made tiny: contsup.train on recipes/imagefolder.toml
    with overrides, then the classes, the reloaded model and a prediction on a val/ image."""
    import contsup
    from conftest import ROOT

    root = make_folder(tmp_path / "images", train=6, val=2)
    run = contsup.train(
        ROOT / "recipes" / "imagefolder.toml",
        overrides=[
            f"data.root={json.dumps(str(root))}", "data.classes=0", "data.size=16", "data.batch_size=6",
            "data.workers=0", 'backbone.use="cifar_resnet20"', "partition.modules=2", "run.epochs=1",
            'run.device="cpu"',
        ],
        out_dir=tmp_path / "run",
    )
    assert run.final is not None and "final test error" in run.summary()
    classes = json.loads((run.run_dir / "classes.json").read_text())
    assert classes == list(CLASSES)
    model = contsup.load_model(run.run_dir)
    recipe = contsup.load_recipe(run.run_dir / "recipe.toml")
    val = recipe.dataset.create().load(train=False)
    x, y = val[0]
    predicted = model(x.unsqueeze(0)).argmax(1).item()
    assert classes[y] == "eight" and 0 <= predicted < 3


def test_the_shipped_folder_recipe_loads_without_a_warning_about_its_workers(tmp_path, recwarn, monkeypatch):
    """recipes/imagefolder.toml on a 2-core machine: torch warns (twice: the training and the
    test loader) when a loader has more worker processes than the machine has cores, and a first
    run should print no such thing. The machine is made a 2-core one for torch's check."""
    import os

    import torch

    import contsup
    from conftest import ROOT
    from contsup.training.loaders import make_loaders

    root = make_folder(tmp_path / "images", train=4, val=2)
    recipe = contsup.load_recipe(
        ROOT / "recipes" / "imagefolder.toml", [f"data.root={json.dumps(str(root))}", "data.classes=0", "data.size=16", "data.batch_size=4"],
    )
    assert recipe.data.workers >= 1  # images decode beside the training, not in its process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    train, test, _ = make_loaders(recipe, recipe.dataset.create(), torch.device("cpu"))
    next(iter(train)), next(iter(test))
    assert not [str(w.message) for w in recwarn if "worker" in str(w.message)]

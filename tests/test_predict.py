"""``contsup predict`` and ``contsup.predict``: image files through a run's own evaluation
transform give what evaluating the test split gives, in a table, JSON or CSV, top-k, batched;
every problem is one line (exit 2) and prints no prediction."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import contsup
from contsup.cli import main
from contsup.config.recipe import load_recipe

from tiny import one_thread  # noqa: F401 (fixture)


def run(args, capsys) -> tuple[int, str, list[str]]:
    code = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err.splitlines()


def evaluated(run_dir: Path) -> tuple[torch.Tensor, list]:
    """Softmax scores of the run's network on its own test split, as evaluation reads it, and the split."""
    network = contsup.load_model(run_dir)
    test = load_recipe(run_dir / "recipe.toml").dataset.create().load(train=False)
    x = torch.stack([test[i][0] for i in range(len(test))])
    with torch.inference_mode():
        return torch.softmax(network(x), dim=1), test


def test_an_imagefolder_run_predicts_its_val_folder_as_evaluation_does(mixed_runs, capsys):
    folder_run, val = mixed_runs / "runs" / "folder-r1e", mixed_runs / "images" / "val"
    scores, test = evaluated(folder_run)
    predictions = contsup.predict(folder_run, [val], top_k=3, batch_size=5)
    assert [p["image"] for p in predictions] == [s.path for s in test.samples]  # sorted as the split is
    names = json.loads((folder_run / "classes.json").read_text())
    for p, expected in zip(predictions, scores):
        top = p["top"]
        assert [t["label"] for t in top] == expected.topk(3).indices.tolist()
        assert [t["score"] for t in top] == pytest.approx(expected.topk(3).values.tolist(), abs=1e-5)
        assert [t["class"] for t in top] == [names[t["label"]] for t in top]
    # the table names each image and its most likely class
    code, out, _ = run(["predict", str(folder_run), str(val / "one"), str(val / "five" / "0009.png")], capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["image", "class", "score"] and len(lines) == 2 + 4 + 1
    first = predictions[[p["image"] for p in predictions].index(str(val / "one" / "0008.png"))]["top"][0]
    assert lines[2].split() == [str(val / "one" / "0008.png"), first["class"], f"{first['score']:.3f}"]


def test_json_csv_top_k_and_batches(mixed_runs, capsys):
    folder_run, val = str(mixed_runs / "runs" / "folder-r1e"), str(mixed_runs / "images" / "val")
    code, out, _ = run(["predict", folder_run, val, "--json", "--top-k", "2"], capsys)
    assert code == 0
    as_json = json.loads(out)
    assert len(as_json) == 12 and all(len(p["top"]) == 2 for p in as_json)
    assert all(p["top"][0]["score"] >= p["top"][1]["score"] for p in as_json)
    code, out, _ = run(["predict", folder_run, val, "--csv", "--top-k", "2", "--batch-size", "1"], capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and list(rows[0]) == ["image", "class_1", "label_1", "score_1", "class_2", "label_2", "score_2"]
    for row, p in zip(rows, as_json):  # one image at a time gives what 64 at a time gave
        assert row["image"] == p["image"] and row["class_1"] == p["top"][0]["class"]
        assert float(row["score_1"]) == pytest.approx(p["top"][0]["score"], rel=1e-4)
    code, out, _ = run(["predict", folder_run, val, "--top-k", "9", "--json"], capsys)
    assert code == 0 and all(len(p["top"]) == 3 for p in json.loads(out))  # no more than the classes
    assert sum(t["score"] for t in json.loads(out)[0]["top"]) == pytest.approx(1.0, abs=1e-5)


def test_the_image_folder_may_be_gone_once_the_run_has_its_classes(mixed_runs, tmp_path, capsys):
    moved = tmp_path / "run"
    shutil.copytree(mixed_runs / "runs" / "folder-r1e", moved)
    images = tmp_path / "images"
    shutil.copytree(mixed_runs / "images" / "val", images)
    recipe = (moved / "recipe.toml").read_text()
    (moved / "recipe.toml").write_text(recipe.replace(str(mixed_runs / "images"), str(tmp_path / "gone")))
    before = contsup.predict(mixed_runs / "runs" / "folder-r1e", [images])
    assert contsup.predict(moved, [images]) == [{**p, "image": p["image"]} for p in before]


def write_digits(folder: Path, count: int = 40) -> tuple[list[Path], torch.Tensor]:
    """The first test images of digits' split as 8x8 grey PNGs (ink 0..16 -> 0..255), and the
    split's own tensors for them."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    _, test_idx = train_test_split(np.arange(len(digits.images)), test_size=0.5, random_state=0, stratify=digits.target)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, i in enumerate(np.sort(test_idx)[:count]):
        path = folder / f"{n:03d}-{digits.target[i]}.png"
        Image.fromarray(np.round(digits.images[i] * 255 / 16).astype(np.uint8), mode="L").save(path)
        paths.append(path)
    return paths, torch.tensor(digits.target[np.sort(test_idx)[:count]])


def test_a_digits_run_predicts_8x8_digit_pngs_as_its_test_split(mixed_runs, tmp_path):
    digits_run = mixed_runs / "runs" / "digits-r1e-2epochs"
    paths, labels = write_digits(tmp_path / "pngs")
    scores, _ = evaluated(digits_run)
    predictions = contsup.predict(digits_run, [tmp_path / "pngs"], top_k=1)
    assert [p["image"] for p in predictions] == [str(p) for p in paths]
    got = torch.tensor([p["top"][0]["score"] for p in predictions])
    expected = scores[: len(paths)].max(dim=1).values
    assert torch.allclose(got, expected, atol=0.02)  # the PNGs round the ink to 8 bits
    agree = sum(p["top"][0]["label"] == int(s.argmax()) for p, s in zip(predictions, scores))
    assert agree >= len(paths) - 1
    assert [p["top"][0]["class"] for p in predictions] == [str(p["top"][0]["label"]) for p in predictions]  # no classes.json
    assert sum(p["top"][0]["label"] == int(y) for p, y in zip(predictions, labels)) > len(paths) // 2


def test_every_problem_is_one_line_and_prints_no_prediction(mixed_runs, finished_runs, tmp_path, capsys):
    digits_run, folder_run = str(mixed_runs / "runs" / "digits-dgl"), str(mixed_runs / "runs" / "folder-r1e")
    good = write_digits(tmp_path / "good", count=3)[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really an image")
    big = tmp_path / "big.png"
    Image.new("L", (16, 16)).save(big)
    colour = tmp_path / "colour.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(colour)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    cases = [
        ([digits_run, str(good[0]), str(broken)], f"error: contsup predict: {broken}: cannot read the image ("),
        ([digits_run, str(good[0]), str(big)], f"error: contsup predict: {big}: 16x16 pixels; digits networks take 8x8 grey images"),
        ([digits_run, str(colour)], f"error: contsup predict: {colour}: a colour image (mode RGB); digits networks take grey images"),
        ([str(tmp_path / "nowhere"), str(good[0])], f"error: contsup predict: {tmp_path / 'nowhere'}: no such run directory"),
        ([str(tmp_path), str(good[0])], f"error: contsup predict: {tmp_path}: not a run directory (it has no recipe.toml)"),
        ([digits_run, str(empty)], f"error: contsup predict: {empty} holds no image files"),
        ([digits_run, str(tmp_path / "missing.png")], f"error: contsup predict: {tmp_path / 'missing.png'}: no such file or folder"),
        ([str(finished_runs / "R1E-k2"), str(good[0])], "error: contsup predict: " + str(finished_runs / "R1E-k2")
         + " was trained on 'synthetic', which reads no image files"),
        ([digits_run, str(good[0]), "--top-k", "0"], "error: contsup predict: --top-k must be at least 1, got 0"),
        ([folder_run, str(good[0]), "--batch-size", "0"], "error: contsup predict: --batch-size must be at least 1, got 0"),
    ]
    for args, start in cases:
        code, out, err = run(["predict", *args], capsys)
        assert code == 2 and out == "", args
        assert len(err) == 1 and err[0].startswith(start), (args, err)
    # a grey image saved in RGB is still grey: accepted
    grey = tmp_path / "grey.png"
    Image.open(good[0]).convert("RGB").save(grey)
    assert contsup.predict(digits_run, [grey]) == [{**p, "image": str(grey)} for p in contsup.predict(digits_run, [good[0]])]


@pytest.mark.parametrize("name, size", [("cifar10", 32), ("cifar100", 32), ("svhn", 32), ("stl10", 96)])
def test_the_torchvision_datasets_transform_image_files_as_their_test_split(registries, name, size):
    """No data files needed: the transform of one image is the test split's own, any mode
    becomes RGB as the dataset's images are, and another size is refused."""
    dataset = registries.datasets.entry(name).component
    transform = dataset(dataset.Options()).image_transform()
    module = __import__(f"contsup_datasets.{name}", fromlist=["x"])
    split = getattr(module, f"{'cifar10' if name == 'cifar100' else name}_transform")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), mode="RGB")
    expected = split(False, module.MEAN, module.STD)(image) if name == "cifar100" else split(False)(image)
    assert torch.equal(transform(image), expected)
    assert transform(image.convert("L")).shape == (3, size, size)
    with pytest.raises(ValueError, match=f"28x28 pixels; .* networks take {size}x{size} images"):
        transform(image.resize((28, 28)))

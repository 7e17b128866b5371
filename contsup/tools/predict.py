"""Predictions of a trained run on image files: each image through the run's dataset's own
evaluation transform (the one its test split uses), the network in eval mode, and the top-k
classes by softmax score, named by the run's ``classes.json`` (else by label index).

Only runs whose dataset reads image files can predict: the dataset provides
``image_transform()`` (imagefolder, digits, cifar10, cifar100, svhn, stl10); any other is
refused in one line. So is every image the transform cannot take (another size for a
fixed-size dataset, colour for digits) and every file that does not decode: the command then
prints no prediction at all.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from contsup.config.reading import read_toml
from contsup.config.recipe import load_recipe
from contsup.core.registry import Registries, load_registries
from contsup.errors import ContsupError, RecipeError, one_line, reason
from contsup.model.network import build_network
from contsup.tools.tables import format_table
from contsup.training.device import resolve_device
from contsup.training.rundir import CLASSES_FILE, RECIPE_FILE, read_classes
from contsup.training.run_evaluation import run_weights

FORMATS = ("table", "json", "csv")


def image_extensions() -> tuple[str, ...]:
    """Every file extension PIL can open (lower case, with the dot)."""
    from PIL import Image

    Image.init()
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))


def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The files named, and the image files under each folder named (recursively, sorted by
    path; hidden files and folders left out), in the order given."""
    if not inputs:
        raise ContsupError("contsup predict: no images given; name image files or a folder holding them")
    extensions = set(image_extensions())
    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(
                p for p in item.rglob("*")
                if p.is_file() and p.suffix.lower() in extensions
                and not any(part.startswith(".") for part in p.relative_to(item).parts)
            )
            if not found:
                raise ContsupError(
                    f"contsup predict: {item} holds no image files (files PIL reads: .png, .jpg, .jpeg, .webp, ...)"
                )
            out += found
        elif item.is_file():
            out.append(item)
        else:
            raise ContsupError(f"contsup predict: {item}: no such file or folder")
    return out


def _recipe(run_dir: Path, registries: Registries) -> Any:
    """The run's recipe. A dataset that counts its classes from a data folder (``data.classes =
    0``) is told the count ``classes.json`` recorded, so predicting needs no training data."""
    overrides = []
    data = read_toml(run_dir / RECIPE_FILE).get("data", {})
    classes = read_classes(run_dir) if (run_dir / CLASSES_FILE).is_file() else None
    if isinstance(data, dict) and data.get("classes") == 0 and classes:
        overrides.append(f"data.classes={len(classes)}")
    try:
        return load_recipe(run_dir / RECIPE_FILE, overrides, registries)
    except RecipeError as exc:
        raise ContsupError(f"contsup predict: {run_dir}: its recipe no longer loads here: {'; '.join(exc.problems)}") from None


def _read(path: Path) -> Any:
    """The image at ``path``, decoded, or one line naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except Exception as exc:  # PIL raises OSError, UnidentifiedImageError, SyntaxError, ValueError...
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise ContsupError(f"contsup predict: {path}: cannot read the image ({why})") from None


def _run_dir(run: str | Path) -> Path:
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise ContsupError(f"contsup predict: {run_dir}: no such run directory")
    if not (run_dir / RECIPE_FILE).is_file():
        raise ContsupError(f"contsup predict: {run_dir}: not a run directory (it has no {RECIPE_FILE})")
    return run_dir


def load_predictor(run: str | Path, registries: Registries, device: str | None = None, warn: Callable[[str], None] | None = None):
    """(network in eval mode on its device, the dataset's image transform, class names, input
    shape, which weights) of a run directory; one-line errors for a missing run or a dataset
    that reads no image files."""
    run_dir = _run_dir(run)
    recipe = _recipe(run_dir, registries)
    dataset = recipe.dataset.create()
    make_transform = getattr(dataset, "image_transform", None)
    if make_transform is None:
        raise ContsupError(
            f"contsup predict: {run_dir} was trained on '{recipe.dataset.use}', which reads no image files; "
            f"predict takes runs of image datasets (imagefolder, digits, cifar10, ...)"
        )
    info = dataset.info()
    names = read_classes(run_dir)
    if names is not None and len(names) != info.num_classes:
        raise ContsupError(
            f"contsup predict: {run_dir / CLASSES_FILE} names {len(names)} classes, the network has {info.num_classes}"
        )
    weights, which = run_weights(run_dir, warn or (lambda line: print(f"warning: {one_line(line)}", file=sys.stderr)))
    with torch.random.fork_rng(devices=[]):  # building initialises weights: leave the caller's RNG alone
        network = build_network(recipe).network
    try:
        network.load_state_dict(weights)
    except RuntimeError as exc:
        raise ContsupError(f"contsup predict: {run_dir}: its weights do not fit its recipe's network ({reason(exc)})") from None
    target = resolve_device(device or recipe.run.device)
    names = names or [str(i) for i in range(info.num_classes)]
    return network.to(target).eval(), make_transform(), names, tuple(info.input_shape), which


def predict(
    run: str | Path, images: Sequence[str | Path], *, top_k: int = 1, batch_size: int = 64, device: str | None = None,
    registries: Registries | None = None,
) -> list[dict[str, Any]]:
    """The top-k classes of every image: ``images`` are files or folders (searched recursively);
    returns one dict per image, in order: ``{"image": path, "top": [{"label", "class", "score"}, ...]}``,
    scores the softmax of the network's output, highest first."""
    if registries is None:
        registries = load_registries()[1]
    if top_k < 1:
        raise ContsupError(f"contsup predict: --top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise ContsupError(f"contsup predict: --batch-size must be at least 1, got {batch_size}")
    _run_dir(run)
    files = image_files(images)
    network, transform, names, shape, _ = load_predictor(run, registries, device)
    k = min(top_k, len(names))
    target = next(network.parameters()).device
    out: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        batch = files[start: start + batch_size]
        x = torch.stack([_input(path, transform, shape) for path in batch]).to(target)
        with torch.inference_mode():
            scores = torch.softmax(network(x).float(), dim=1).cpu()
        top = scores.topk(k, dim=1)
        for path, values, labels in zip(batch, top.values.tolist(), top.indices.tolist()):
            out.append({
                "image": str(path),
                "top": [{"label": int(i), "class": names[i], "score": float(v)} for v, i in zip(values, labels)],
            })
    return out


def _input(path: Path, transform: Callable[[Any], Any], shape: tuple[int, ...]) -> Any:
    """One image through the dataset's transform, checked against the network's input shape."""
    image = _read(path)
    try:
        x = transform(image)
    except ValueError as exc:
        raise ContsupError(f"contsup predict: {path}: {one_line(str(exc))}") from None
    if tuple(x.shape) != shape:
        got, want = "x".join(map(str, x.shape)), "x".join(map(str, shape))
        raise ContsupError(f"contsup predict: {path}: the run's transform makes it {got}; the network takes {want}")
    return x


# -- output ----------------------------------------------------------------------------------------


def as_table(predictions: Sequence[dict[str, Any]]) -> str:
    """One line per image: the image, its most likely class and score, and the others of the top k."""
    rows = [("image", "class", "score") + (("next",) if any(len(p["top"]) > 1 for p in predictions) else ())]
    for p in predictions:
        best, rest = p["top"][0], p["top"][1:]
        row = (p["image"], best["class"], f"{best['score']:.3f}")
        if len(rows[0]) > 3:
            row += (", ".join(f"{t['class']} {t['score']:.3f}" for t in rest) or "-",)
        rows.append(row)
    return format_table(rows) + "\n"


def as_csv(predictions: Sequence[dict[str, Any]]) -> str:
    """One row per image: ``image``, then ``class_i``, ``label_i``, ``score_i`` for i = 1..k."""
    k = max((len(p["top"]) for p in predictions), default=1)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", *(f"{field}_{i}" for i in range(1, k + 1) for field in ("class", "label", "score"))])
    for p in predictions:
        writer.writerow([p["image"], *(value for t in p["top"] for value in (t["class"], t["label"], f"{t['score']:.6g}"))])
    return buffer.getvalue()


def as_json(predictions: Iterable[dict[str, Any]]) -> str:
    return json.dumps(list(predictions), indent=1) + "\n"


def predict_main(
    run: str, images: Sequence[str], registries: Registries, *, top_k: int = 1, batch_size: int = 64,
    device: str | None = None, output: str = "table",
) -> int:
    """``contsup predict``: print the predictions as a table, JSON or CSV."""
    predictions = predict(run, images, top_k=top_k, batch_size=batch_size, device=device, registries=registries)
    text = {"json": as_json, "csv": as_csv}.get(output, as_table)(predictions)
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0


__all__ = ["predict", "predict_main", "image_files", "load_predictor", "as_table", "as_csv", "as_json"]

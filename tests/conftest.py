"""Shared fixtures: plugin registries and small, fast recipes on synthetic data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from contsup.core.plugins import get_plugin_manager
from contsup.config.recipe import loads_recipe
from contsup.core.registry import Registries

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(min(2, os.cpu_count() or 1))

SMALL = """
[run]
seed = {seed}
epochs = {epochs}
mode = "{mode}"
out_dir = "{out_dir}"

[data]
use = "synthetic"
shape = [3, 16, 16]
train_size = {train_size}
test_size = 32
batch_size = {batch_size}

[backbone]
use = "{backbone}"

[partition]
modules = {modules}

[context]
use = "{context}"

[optimizer]
lr = 0.05
"""


def small_recipe_text(
    *,
    seed: int = 0,
    epochs: int = 1,
    mode: str = "greedy",
    out_dir: str = "",
    train_size: int = 64,
    batch_size: int = 16,
    backbone: str = "cifar_resnet20",
    modules: int = 4,
    context: str = "R1E",
    extra: str = "",
) -> str:
    """A small synthetic-data recipe as TOML text (3x16x16 images, ResNet-20)."""
    return SMALL.format(**locals()) + extra


@pytest.fixture(scope="session")
def registries() -> Registries:
    return Registries.from_plugin_manager(get_plugin_manager(entry_points=False))


@pytest.fixture
def small_recipe(registries):
    """A factory: keyword arguments of :func:`small_recipe_text` -> validated Recipe."""

    def make(**kwargs):
        return loads_recipe(small_recipe_text(**kwargs), registries, source="small.toml")

    return make


@pytest.fixture
def write_recipe(tmp_path):
    """A factory writing TOML text to a file in tmp_path and returning its path."""

    def write(text: str, name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture(scope="session")
def finished_runs(tmp_path_factory):
    """Four tiny finished runs (DGL and R1E, K = 2 and 4, two epochs) under one folder, trained
    once per test session; tests that write into run directories copy them first."""
    from contsup.cli import main

    root = tmp_path_factory.mktemp("finished_runs")
    for context in ("none", "R1E"):
        for k in (2, 4):
            out = root / f"{context}-k{k}"
            text = small_recipe_text(out_dir=str(out), context=context, modules=k, epochs=2, train_size=48)
            recipe = root / f"{context}-k{k}.toml"
            recipe.write_text(text)
            assert main(["train", str(recipe)]) == 0
    return root


MIXED_DIGITS = """
[run]
seed = 0
epochs = {epochs}
mode = "{mode}"

[data]
use = "digits"
size = 8
test_fraction = 0.5
batch_size = 64

[backbone]
use = "cifar_resnet20"

[partition]
modules = {modules}

[context]
use = "{context}"

[optimizer]
lr = 0.05
"""

MIXED_FOLDER = """
[run]
epochs = 2

[data]
use = "imagefolder"
root = "{root}"
size = 16
augment = "light"
batch_size = 8

[backbone]
use = "cifar_resnet20"

[partition]
modules = 2

[context]
use = "R1E"

[optimizer]
lr = 0.05
"""


@pytest.fixture(scope="session")
def mixed_runs(tmp_path_factory):
    """An ordinary folder of five finished runs made by real short trainings, as a user's folder
    looks: digits R1E at one and two epochs, DGL at another K, end to end, and an imagefolder run
    on digits PNGs (``runs/`` beside the image folder ``images/``). Trained once per session."""
    from contsup.cli import main
    from test_imagefolder import make_folder

    root = tmp_path_factory.mktemp("mixed")
    images = make_folder(root / "images")
    recipes = {
        "digits-r1e-1epoch": MIXED_DIGITS.format(epochs=1, mode="greedy", modules=4, context="R1E"),
        "digits-r1e-2epochs": MIXED_DIGITS.format(epochs=2, mode="greedy", modules=4, context="R1E"),
        "digits-dgl": MIXED_DIGITS.format(epochs=2, mode="greedy", modules=2, context="none"),
        "digits-e2e": MIXED_DIGITS.format(epochs=1, mode="e2e", modules=1, context="none"),
        "folder-r1e": MIXED_FOLDER.format(root=images),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, text in recipes.items():
            path = root / f"{name}.toml"
            path.write_text(text)
            assert main(["train", str(path), "--set", f"run.out_dir={root / 'runs' / name}"]) == 0
    finally:
        torch.set_num_threads(threads)
    return root

"""Tiny runs for the run-lifecycle tests: a few steps per epoch on 8x8 synthetic images, and
helpers to compare two runs exactly."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from contsup.cli import main
from contsup.training.loop import Trainer
from contsup.config.recipe import loads_recipe
from contsup.training.rundir import read_metrics

from conftest import small_recipe_text

# Measured, not computed: they differ between two runs of the same recipe.
MEASURED = ("images_per_s", "epoch_time_s", "peak_memory_bytes")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny runs are fastest on one thread (more threads only wait for each other on a busy
    machine); a module using tiny runs imports this fixture to apply it to its tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_recipe_text(out_dir: Path | str, *, epochs: int = 2, train_size: int = 32, batch_size: int = 8,
                     modules: int = 3, context: str = "R1E", extra: str = "", **kwargs) -> str:
    """3x8x8 images, ResNet-20 in ``modules`` modules, ``train_size / batch_size`` steps per epoch."""
    text = small_recipe_text(
        out_dir=str(out_dir), epochs=epochs, train_size=train_size, batch_size=batch_size, modules=modules,
        context=context, **kwargs,
    )
    return text.replace("shape = [3, 16, 16]", "shape = [3, 8, 8]").replace("test_size = 32", "test_size = 16") + extra


def without_measured(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in MEASURED} for m in metrics]


def assert_same_runs(a: Path, b: Path) -> None:
    """Bit-identical final weights and identical metrics (measured fields aside)."""
    wa = torch.load(Path(a) / "model.pt", weights_only=True)
    wb = torch.load(Path(b) / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    ma, mb = read_metrics(a), read_metrics(b)
    assert [m["epoch"] for m in ma] == [m["epoch"] for m in mb]
    assert without_measured(ma) == without_measured(mb)


def one_process(registries, text: str, run_dir: Path) -> Trainer:
    """A distributed recipe's text trained in this process instead (distributed.mode = "none"),
    one module after another: what the distributed runs are compared with."""
    single = re.sub(r'mode = "(data|pipeline)"', 'mode = "none"', text)
    trainer = Trainer(loads_recipe(single, registries, source="tiny.toml"), run_dir, log=open(os.devnull, "w"))
    trainer.fit()
    return trainer


DIGITS_EPOCH = """
[run]
seed = 0
epochs = 1
out_dir = "{out_dir}"

[data]
use = "digits"
size = 8
test_fraction = 0.5
batch_size = 64

[backbone]
use = "cifar_resnet20"

[partition]
modules = 4

[context]
use = "none"

[optimizer]
lr = 0.05
"""


def validate_plan_and_train_a_digits_epoch(tmp_path: Path, tables: str, name: str, in_plan: str, capsys) -> None:
    """A real digits epoch (8x8 images, ResNet-20 in 4 modules, no context) with ``tables``
    added: it validates, its plan prints ``in_plan``, and it trains to a test error below 100 %."""
    path = tmp_path / name
    path.write_text(DIGITS_EPOCH.format(out_dir=tmp_path / "run") + tables)
    assert main(["validate", str(path)]) == 0
    assert main(["plan", str(path)]) == 0
    assert in_plan in capsys.readouterr().out
    assert main(["train", str(path)]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["test_error_pct"] < 100.0

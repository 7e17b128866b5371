"""Start-up cost of the command line: `contsup --help` and `contsup list KIND` answer without
importing torch or the other heavy packages (seconds each), and still list every built-in.

Each command runs in a fresh interpreter, since this one has torch imported already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "timm", "torchvision", "sklearn", "scipy", "matplotlib", "tensorboard", "mlflow", "wandb")

SCRIPT = """
import contextlib, io, json, sys
import contsup.cli

codes, out = [], io.StringIO()
with contextlib.redirect_stdout(out):
    for argv in json.loads(sys.argv[1]):
        try:
            codes.append(contsup.cli.main(argv))
        except SystemExit as exc:  # --help: argparse prints the help and exits
            codes.append(exc.code)
heavy = [m for m in json.loads(sys.argv[2]) if m in sys.modules]
print(json.dumps({"codes": codes, "out": out.getvalue(), "heavy": heavy}))
"""


def run_fresh(*commands: list[str]) -> dict:
    """Run ``contsup.cli.main(argv)`` for each argv in one new interpreter, built-in plugins only."""
    env = {**os.environ, "CONTSUP_LOAD_PLUGINS": ""}  # an installed third-party plugin may import torch
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(list(commands)), json.dumps(HEAVY)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def listed(out: str) -> list[str]:
    """The component names of `contsup list` output: the first word of each unindented line."""
    return [line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")]


def test_help_imports_no_heavy_package():
    result = run_fresh(["--help"])
    assert result["codes"] == [0]
    assert "list" in result["out"] and "validate" in result["out"]
    assert result["heavy"] == []


def test_list_backbones_imports_no_heavy_package():
    result = run_fresh(["list", "backbones"])
    assert result["codes"] == [0]
    assert listed(result["out"]) == ["cifar_resnet20", "cifar_resnet32", "cifar_resnet56", "cifar_resnet110", "timm"]
    assert "also by name: resnet18, resnet34, resnet50" in result["out"]
    assert "model = required" in result["out"]
    assert result["heavy"] == []


def test_list_context_selectors_imports_no_heavy_package():
    result = run_fresh(["list", "context_selectors"])
    assert result["codes"] == [0]
    assert listed(result["out"]) == ["contsup", "stage"]  # stage: the layout-aware built-in (issue 16)
    assert "R1E" in result["out"] and "encoder = " in result["out"] and "shortcut = " in result["out"]
    assert result["heavy"] == []


@pytest.mark.parametrize(
    "kind, names",
    [
        ("partitioners", ["uniform", "memory_balanced", "cuts"]),
        ("objectives", ["cross_entropy", "supcon"]),
        ("decoders", ["infopro"]),
        ("datasets", ["digits", "synthetic", "cifar10", "cifar100", "svhn", "stl10", "imagefolder"]),
        ("optimizers", ["sgd"]),
        ("schedules", ["cosine", "constant", "official_cosine"]),
        ("loggers", ["tensorboard", "csv", "mlflow", "wandb"]),
    ],
)
def test_every_list_kind_imports_no_heavy_package(kind, names):
    result = run_fresh(["list", kind])
    assert result["codes"] == [0]
    assert listed(result["out"]) == names
    assert result["heavy"] == []


def test_every_list_kind_in_one_process_imports_no_heavy_package():
    """All kinds one after the other: nothing a listing leaves loaded pulls torch in for the next."""
    kinds = ["backbones", "partitioners", "context_selectors", "objectives", "decoders", "datasets", "optimizers", "schedules"]
    result = run_fresh(*(["list", kind] for kind in kinds))
    assert result["codes"] == [0] * len(kinds)
    assert result["heavy"] == []

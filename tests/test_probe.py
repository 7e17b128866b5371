"""The information probe: the estimator on synthetic features with known answers, the features it
reads from a network, and the command on finished runs."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from contsup.cli import main
from contsup.errors import ContsupError
from contsup.model.network import build_network
from contsup.tools.probe import (
    ProbeNet,
    ProbeOptions,
    chunks,
    estimate_information,
    feature_shapes,
    label_entropy,
    outputs_upto,
    parse_modules,
)

FAST = ProbeOptions(epochs=6, width=8, batch_size=32)


def synthetic(n: int, determined: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """10 balanced-in-expectation classes; h: (n, 10, 4, 4) noise, plus a bump in channel y when
    the feature is to determine the label."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    h = 0.5 * torch.randn(n, 10, 4, 4, generator=g)
    if determined:
        h[torch.arange(n), y] += 2.0
    return h, y


def test_a_feature_that_determines_the_label_carries_log_10_nats():
    train, test = synthetic(400, True, 0), synthetic(200, True, 1)
    r = estimate_information(*train, *test, 10, FAST)
    assert r.entropy_nats == pytest.approx(math.log(10), abs=0.05)
    assert r.information_nats == pytest.approx(math.log(10), abs=0.12)
    assert r.accuracy_pct > 95


def test_a_feature_independent_of_the_label_carries_nothing():
    train, test = synthetic(400, False, 0), synthetic(200, False, 1)
    r = estimate_information(*train, *test, 10, FAST)
    assert abs(r.information_nats) < 0.1
    assert r.accuracy_pct < 25


def test_the_estimate_is_deterministic_and_picks_the_best_validation_epoch():
    train, test = synthetic(200, False, 2), synthetic(100, False, 3)
    options = ProbeOptions(epochs=3, width=4, batch_size=32)
    a = estimate_information(*train, *test, 10, options)
    b = estimate_information(*train, *test, 10, options)
    assert a == b
    best = min(a.history, key=lambda row: row["val_ce_nats"])
    assert a.best_epoch == best["epoch"] and a.cross_entropy_nats == best["test_ce_nats"]
    assert a.information_nats == pytest.approx(a.entropy_nats - best["test_ce_nats"])
    last = estimate_information(*train, *test, 10, ProbeOptions(epochs=3, width=4, batch_size=32, val_fraction=0.0))
    assert last.best_epoch == 3  # without a validation split the last epoch counts


def test_label_entropy():
    assert label_entropy(torch.arange(10), 10) == pytest.approx(math.log(10))
    assert label_entropy(torch.zeros(7, dtype=torch.long), 10) == 0.0
    assert label_entropy(torch.tensor([0, 1]), 10) == pytest.approx(math.log(2))


@pytest.mark.parametrize("shape", [(64, 4, 4), (16, 16, 16), (3, 20, 20)])
def test_the_probe_adapts_channels_and_size_in_its_first_layer(shape):
    probe = ProbeNet(shape, num_classes=7, depth=8, width=4, size=16)
    h = torch.randn(2, *shape)
    assert probe.resize(h).shape == (2, shape[0], 16, 16)
    assert probe(h).shape == (2, 7)


def test_features_up_to_a_module_match_the_whole_forward(small_recipe):
    torch.manual_seed(0)
    network = build_network(small_recipe(context="R1E", modules=4)).network.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        full = network.module_outputs(x)
        part = outputs_upto(network, x, 3)
    assert len(part) == 3 and all(torch.equal(a, b) for a, b in zip(part, full))
    shapes = feature_shapes(network, (3, 16, 16))
    assert shapes[0] == (3, 16, 16) and shapes[1:] == [tuple(h.shape[1:]) for h in full]


@given(st.lists(st.integers(1, 50), min_size=1, max_size=12), st.integers(1, 60))
def test_chunks_keep_order_and_fit_the_limit(sizes, limit):
    modules = list(range(len(sizes)))
    groups = chunks(modules, sizes, limit)
    assert [m for g in groups for m in g] == modules
    for g in groups:
        assert len(g) == 1 or sum(sizes[m] for m in g) <= limit


def test_parse_modules():
    assert parse_modules(None, 3) == [0, 1, 2, 3]
    assert parse_modules("0, 2-3", 4) == [0, 2, 3]
    with pytest.raises(ContsupError, match="outside 0..4"):
        parse_modules("5", 4)
    with pytest.raises(ContsupError, match="not a module index"):
        parse_modules("a", 4)


TINY = ["--epochs", "1", "--width", "4", "--batch-size", "16", "--val-fraction", "0.25"]


def test_probe_command_writes_json_and_one_figure_for_several_runs(finished_runs, tmp_path, capsys):
    runs = [tmp_path / "dgl", tmp_path / "r1e"]
    shutil.copytree(finished_runs / "none-k2", runs[0])
    shutil.copytree(finished_runs / "R1E-k2", runs[1])
    png = tmp_path / "both.png"
    assert main(["probe", *map(str, runs), "-o", str(png), "--repeats", "2", *TINY]) == 0
    out = capsys.readouterr().out
    for run in runs:
        data = json.loads((run / "probe.json").read_text())
        assert [r["module"] for r in data["results"]] == [0, 1, 2]
        assert data["results"][0]["shape"] == [3, 16, 16]
        assert data["options"]["epochs"] == 1 and data["probe_side"] == 16
        for r in data["results"]:
            assert r["information_nats"] == pytest.approx(data["entropy_nats"] - r["cross_entropy_nats"])
            each = [p["information_nats"] for p in r["probes"]]
            assert len(each) == 2 and r["information_nats"] == pytest.approx(sum(each) / 2)
            assert r["information_std_nats"] == pytest.approx(abs(each[0] - each[1]) / 2**0.5)
    assert "DGL, K=2" in out and "ContSup R1E, K=2" in out
    with Image.open(png) as image:
        assert image.size[0] > 600 and image.size[1] > 300
    # the same options reuse the saved estimates; other options probe again
    before = (runs[0] / "probe.json").read_text()
    assert main(["probe", str(runs[0]), "--reuse", "--repeats", "2", *TINY]) == 0
    assert "reusing probe.json" in capsys.readouterr().err
    assert (runs[0] / "probe.json").read_text() == before and (runs[0] / "probe.png").exists()
    # a subset of what is saved is reused, and the file keeps every module
    assert main(["probe", str(runs[0]), "--reuse", "--repeats", "2", "--modules", "1", *TINY]) == 0
    assert "reusing probe.json" in capsys.readouterr().err
    assert (runs[0] / "probe.json").read_text() == before
    assert main(["probe", str(runs[0]), "--reuse", "--modules", "2", *TINY]) == 0
    assert "made with other options" in capsys.readouterr().err
    assert [r["module"] for r in json.loads((runs[0] / "probe.json").read_text())["results"]] == [2]
    # probing more modules with the same options adds them; --reuse probes only what is missing
    assert main(["probe", str(runs[0]), "--modules", "0", *TINY]) == 0
    assert [r["module"] for r in json.loads((runs[0] / "probe.json").read_text())["results"]] == [0, 2]
    capsys.readouterr()
    assert main(["probe", str(runs[0]), "--reuse", "--modules", "0-2", *TINY]) == 0
    assert "lacks modules 1; probing them" in capsys.readouterr().err
    assert [r["module"] for r in json.loads((runs[0] / "probe.json").read_text())["results"]] == [0, 1, 2]


def test_probe_command_reports_bad_input(finished_runs, tmp_path, capsys):
    assert main(["probe", str(tmp_path), "--epochs", "0", "--depth", "9"]) == 2
    err = capsys.readouterr().err
    assert "--epochs: must be >= 1" in err and "--depth: must be 6n+2" in err
    assert main(["probe", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["probe", str(finished_runs / "none-k2"), "--modules", "9"]) == 2
    assert "outside 0..2" in capsys.readouterr().err

"""The context weight map: entries against a direct computation on a hand-built network, and the
command's JSON and heat map."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from PIL import Image
from torch import nn

from contsup.cli import main
from contsup.model.network import ContextModule, FinalCrossEntropy, GreedyNetwork
from contsup.types import Source
from contsup.tools.weights import adapter_norm, plot_weight_map, weight_map
from contsup_context.adapters import InputEncoder, OfficialShortcutAdapter, ShortcutAdapter


def hand_built() -> GreedyNetwork:
    """Three modules on (2, 4, 4) inputs: module 2 reads x (M_E) and h0 (M_R), module 3 reads h1
    through the official M_R (conv, BN, ReLU, pool); every weight and BN statistic set by hand."""
    enc = InputEncoder((2, 4, 4), (3, 4, 4), hidden=5)
    short = ShortcutAdapter((2, 4, 4), (3, 4, 4))
    official = OfficialShortcutAdapter((3, 4, 4), (3, 2, 2))
    with torch.no_grad():
        for i, conv in enumerate([enc.conv1, enc.conv2, short.conv, official.conv]):
            n = conv.weight.numel()
            conv.weight.copy_(((torch.arange(n) % 7) - 3.0).view_as(conv.weight) * (0.1 + i))
        for bn, gamma, var in [(enc.bn1, 2.0, 3.0), (enc.bn2, -0.5, 0.25), (official.bn, 1.5, 8.0)]:
            bn.weight.copy_(torch.linspace(gamma, gamma + 1, bn.num_features))
            bn.running_var.copy_(torch.full((bn.num_features,), var))
    def head() -> nn.Module:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))

    m1 = ContextModule(1, nn.Conv2d(2, 2, 3, padding=1), (), {}, head=nn.Sequential(nn.Flatten(), nn.Linear(32, 4)), objective=FinalCrossEntropy())
    m2 = ContextModule(2, nn.Conv2d(2, 3, 3, padding=1), (Source.input(), Source.feature(0)), {Source.input(): enc, Source.feature(0): short}, head=head(), objective=FinalCrossEntropy())
    m3 = ContextModule(3, nn.Conv2d(3, 3, 3, stride=2, padding=1), (Source.feature(1),), {Source.feature(1): official}, head=head(), objective=FinalCrossEntropy())
    return GreedyNetwork([m1, m2, m3]).eval()


def direct(layers: list[tuple[torch.Tensor, nn.BatchNorm2d | None]]) -> float:
    """The definition written out with loops: per layer, sum over (o, i) of the kernel's L1 norm,
    times |gamma_o| / sqrt(var_o + eps) when a BN follows, over C_out * C_in; then the mean."""
    values = []
    for w, bn in layers:
        w = w.detach()
        c_out, c_in = w.shape[:2]
        total = 0.0
        for o in range(c_out):
            scale = 1.0 if bn is None else abs(bn.weight.detach()[o].item()) / math.sqrt(bn.running_var[o].item() + bn.eps)
            for i in range(c_in):
                total += scale * float(w[o, i].abs().sum())
        values.append(total / (c_out * c_in))
    return sum(values) / len(values)


def test_entries_match_a_direct_computation():
    network = hand_built()
    enc, short, official = network.blocks[1].adapters["x"], network.blocks[1].adapters["h0"], network.blocks[2].adapters["h1"]
    entries = {(e["destination"], e["source"]): e for e in weight_map(network)}
    assert set(entries) == {(2, "x"), (2, "h0"), (3, "h1")}
    assert entries[(2, "x")]["value"] == pytest.approx(direct([(enc.conv1.weight, enc.bn1), (enc.conv2.weight, enc.bn2)]), rel=1e-5)
    assert entries[(2, "h0")]["value"] == pytest.approx(direct([(short.conv.weight, None)]), rel=1e-5)
    assert entries[(2, "h0")]["value"] == pytest.approx(short.conv.weight.detach().abs().mean().item(), rel=1e-5)  # 1x1: mean |W|
    assert entries[(3, "h1")]["value"] == pytest.approx(direct([(official.conv.weight, official.bn)]), rel=1e-5)
    assert entries[(2, "x")]["layers"] == 2 and entries[(3, "h1")]["adapter"] == "OfficialShortcutAdapter"
    raw = {(e["destination"], e["source"]): e["value"] for e in weight_map(network, fold_bn=False)}
    assert raw[(2, "x")] == pytest.approx(direct([(enc.conv1.weight, None), (enc.conv2.weight, None)]), rel=1e-5)
    assert raw[(2, "h0")] == pytest.approx(entries[(2, "h0")]["value"])


def test_an_adapter_without_weights_has_no_entry_value():
    assert adapter_norm(nn.AdaptiveAvgPool2d(2)) is None


def test_the_heat_map_draws_sources_against_destinations(tmp_path):
    data = {"modules": 3, "label": "hand-built", "entries": weight_map(hand_built())}
    path = plot_weight_map(data, tmp_path / "w.png")
    with Image.open(path) as image:
        assert image.size[0] > 400 and image.size[1] > 300
        assert image.convert("L").getextrema()[0] < 100  # not blank


def test_weights_command_writes_json_and_png(finished_runs, tmp_path, capsys):
    run = tmp_path / "r1e"
    shutil.copytree(finished_runs / "R1E-k4", run)
    assert main(["weights", str(run)]) == 0
    data = json.loads((run / "weights.json").read_text())
    pairs = {(e["destination"], e["source"]) for e in data["entries"]}
    assert pairs == {(2, "x"), (2, "h0"), (3, "x"), (3, "h1"), (4, "x"), (4, "h2")}
    assert all(e["value"] > 0 for e in data["entries"]) and data["fold_bn"] is True
    with Image.open(run / "weights.png") as image:
        assert image.size[0] > 400 and image.size[1] > 300
    assert "module   2 <-    x" in capsys.readouterr().out
    assert main(["weights", str(finished_runs / "none-k2"), "-o", str(tmp_path / "dgl.png")]) == 2
    assert "no context adapters" in capsys.readouterr().err

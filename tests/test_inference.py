"""Inference cost of context: the bare forward is the network minus its adapters, the timings are
well formed, and ``contsup bench --inference`` takes a recipe or a run directory."""

from __future__ import annotations

import json

import torch
from torch import nn

from contsup.cli import main
from contsup.tools.inference import bare_forward, count_macs, inference_cost
from contsup.model.network import build_network

from conftest import small_recipe_text


def test_bare_forward_is_the_network_without_context(small_recipe):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    dgl = build_network(small_recipe(context="none")).network.eval()
    r1e = build_network(small_recipe(context="R1E")).network.eval()
    with torch.no_grad():
        assert torch.equal(bare_forward(dgl, x), dgl(x))  # nothing to skip
        assert not torch.allclose(bare_forward(r1e, x), r1e(x))  # the adapters change the output
        for m in r1e.blocks:  # and skipping them is running the bodies alone
            for adapter in m.adapters.values():
                for p in adapter.parameters():
                    p.zero_()
        assert torch.allclose(bare_forward(r1e, x), r1e(x), atol=1e-5)


def test_inference_cost_times_both_passes(small_recipe):
    torch.manual_seed(0)
    network = build_network(small_recipe(context="R1E", modules=4)).network
    batches = [torch.randn(8, 3, 16, 16) for _ in range(3)]
    cost = inference_cost(network, batches, torch.device("cpu"), repeats=3, warmup=1)
    assert len(cost.with_context_runs) == 3 and len(cost.without_context_runs) == 3
    assert cost.with_context_s > 0 and cost.without_context_s > 0
    assert cost.ratio == cost.with_context_s / cost.without_context_s
    assert cost.images == 24 and cost.batches == 3
    assert cost.adapters == 6  # modules 2..4 each read x and one earlier feature
    assert cost.adapter_params == sum(p.numel() for m in network.blocks for p in m.adapters.parameters())
    assert cost.with_context_macs > cost.without_context_macs > 0
    assert cost.paired_ratio > 0


def test_macs_count_convolutions_and_linear_layers():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    x = torch.randn(2, 3, 4, 4)
    assert count_macs(net, net, x) == 8 * 4 * 4 * (3 * 3 * 3) + 5 * 128


def test_bench_inference_on_a_recipe_and_a_run_directory(write_recipe, finished_runs, tmp_path, capsys):
    recipe = write_recipe(small_recipe_text(modules=4))
    out = tmp_path / "bench.json"
    assert main(["bench", "--inference", str(recipe), "--repeats", "2", "--warmup", "0", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["modules"] == 4 and data["context"] == "R1E" and data["adapters"] == 6
    assert data["ratio"] > 0 and len(data["with_context_runs"]) == 2
    assert "ratio" in capsys.readouterr().out
    assert main(["bench", "--inference", str(finished_runs / "R1E-k2"), "--repeats", "1", "--warmup", "0"]) == 0
    assert "trained network" in capsys.readouterr().out


def test_bench_inference_errors_are_one_line(write_recipe, capsys):
    assert main(["bench", "--inference", "nowhere.toml"]) == 2
    assert "no such recipe file or run directory" in capsys.readouterr().err
    assert main(["bench", "--inference", str(write_recipe(small_recipe_text())), "--repeats", "0"]) == 2

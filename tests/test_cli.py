"""The contsup command: train writes a complete run directory; plan, plugins, list."""

from __future__ import annotations

import json

import pytest
import torch

import contsup
from contsup.cli import main
from contsup.core.plugins import BUILTIN_PLUGINS
from contsup.training.rundir import read_metrics

from conftest import small_recipe_text

METRIC_KEYS = {
    "epoch", "step", "lr", "train_loss", "train_acc_pct", "test_error_pct", "test_loss",
    "test_local_acc_pct", "images_per_s", "epoch_time_s", "peak_memory_bytes", "memory_kind",
}


def test_train_writes_a_complete_run_directory(write_recipe, tmp_path, capsys):
    out_dir = tmp_path / "run"
    path = write_recipe(small_recipe_text(out_dir=str(out_dir), epochs=2, modules=3, context="R1E"))
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert "final test error:" in out and str(out_dir) in out
    assert {p.name for p in out_dir.iterdir()} >= {"recipe.toml", "plugins.json", "metrics.jsonl", "model.pt"}
    metrics = read_metrics(out_dir)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert set(m) == METRIC_KEYS
        assert len(m["train_loss"]) == len(m["test_local_acc_pct"]) == 3
        assert 0 <= m["test_error_pct"] <= 100
    assert abs(metrics[-1]["test_error_pct"] - (100 - metrics[-1]["test_local_acc_pct"][-1])) < 1e-9
    versions = json.loads((out_dir / "plugins.json").read_text())
    assert versions["torch"] == torch.__version__
    assert list(versions["plugins"]) == list(BUILTIN_PLUGINS)  # every loaded plugin, used or not
    assert {name: p["recipe"] for name, p in versions["plugins"].items() if p["recipe"]} == {
        "contsup_datasets": {"data": "synthetic"}, "contsup_timm": {"backbone": "cifar_resnet20"},
        "contsup_partition": {"partition": "uniform"}, "contsup_context": {"context": "R1E"},
        "contsup_objectives": {"objective": "cross_entropy"},
    }
    # the run's own recipe validates and the model loads as an ordinary module
    assert main(["validate", str(out_dir / "recipe.toml")]) == 0
    model = contsup.load_model(out_dir)
    assert isinstance(model, torch.nn.Module) and not model.training
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == (2, 10)


def test_a_run_directory_is_never_overwritten(write_recipe, tmp_path, capsys):
    out_dir = tmp_path / "run"
    path = write_recipe(small_recipe_text(out_dir=str(out_dir), train_size=16, modules=2))
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"run directory {out_dir} already exists" in err and "Traceback" not in err
    assert main(["train", str(path), "--new"]) == 0
    assert (tmp_path / "run-2" / "model.pt").exists()
    assert f'out_dir = "{tmp_path / "run-2"}"' in (tmp_path / "run-2" / "recipe.toml").read_text()
    assert f'out_dir = "{out_dir}"' in (out_dir / "recipe.toml").read_text()


def test_plan_json_lists_modules(write_recipe, capsys):
    path = write_recipe(small_recipe_text(modules=4, context="M1R1E"))
    assert main(["plan", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    modules = data["modules"]
    assert [m["index"] for m in modules] == [1, 2, 3, 4]
    assert [m["units"] for m in modules] == [2, 2, 3, 3]
    assert [m["unit_range"] for m in modules] == [[0, 1], [2, 3], [4, 6], [7, 9]]
    assert [m["sources"] for m in modules] == [[], ["x", "h0"], ["x", "h0", "h1"], ["x", "h1", "h2"]]
    assert modules[-1]["output_shape"] == [64, 4, 4]
    assert all(isinstance(m["params"], int) and m["params"] > 0 for m in modules)
    assert main(["plan", str(path)]) == 0
    assert "unit range" in capsys.readouterr().out


PLAN_HYBRID = """
[decoder]
use = "infopro"
ixx_1 = 1.0
ixy_1 = 0.0
ixx_2 = 0.2
ixy_2 = 1.0

[[modules]]
range = [1, 2]
context = { use = "none" }

[[modules]]
range = [3, 5]
context = { use = "R1E" }
objective = { use = "supcon", head = "0c2f" }
"""


def test_plan_shows_each_modules_objective_head_decoder_and_weights(write_recipe, capsys):
    path = write_recipe(small_recipe_text(modules=5, context="none") + PLAN_HYBRID)
    assert main(["plan", str(path), "--json"]) == 0
    modules = json.loads(capsys.readouterr().out)["modules"]
    shown = [(m["context"], m["objective"], m["head"], m["decoder"]) for m in modules]
    assert shown == [
        ("none", "cross_entropy", "1c2f", "infopro"),
        ("none", "cross_entropy", "1c2f", "infopro"),
        ("R1E", "supcon", "0c2f", "infopro"),
        ("R1E", "supcon", "0c2f", "infopro"),
        ("R1E", "cross_entropy (backbone head)", "backbone", None),
    ]
    weights = [(m["weights"]["reconstruction"], m["weights"]["local"]) for m in modules]
    assert weights[1:3] == [pytest.approx((0.2 / 3 + 2 / 3, 1 / 3)), pytest.approx((0.4 / 3 + 1 / 3, 2 / 3))]
    # the ends exactly (ixx_1, ixy_1) and (ixx_2, ixy_2), as written in the recipe
    assert [weights[0], weights[3], weights[4]] == [(1.0, 0.0), (0.2, 1.0), (0.0, 1.0)]
    assert main(["plan", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("5 modules, context per [[modules]] range")
    assert lines[1].split() == [
        "module", "units", "unit", "range", "sources", "params", "output", "shape", "context", "objective", "head",
        "decoder", "(w_rec,", "w_local)",
    ]
    rows = [line.split("  ") for line in lines[3:8]]
    cells = [[c.strip() for c in row if c.strip()][-4:] for row in rows]
    assert cells == [
        ["none", "cross_entropy", "1c2f", "infopro (1, 0)"],
        ["none", "cross_entropy", "1c2f", "infopro (0.733333, 0.333333)"],
        ["R1E", "supcon", "0c2f", "infopro (0.466667, 0.666667)"],
        ["R1E", "supcon", "0c2f", "infopro (0.2, 1)"],
        ["R1E", "cross_entropy (backbone head)", "backbone", "-"],
    ]


def test_the_plans_second_table_names_a_decoder_column_only_when_it_has_one(write_recipe, capsys):
    for extra, parts, column in (("", "body + head + adapters:", False), (PLAN_HYBRID, "body + head + adapters + decoder:", True)):
        path = write_recipe(small_recipe_text(modules=5, context="none") + extra)
        assert main(["plan", str(path)]) == 0
        lines = capsys.readouterr().out.splitlines()
        (i,) = [i for i, line in enumerate(lines) if line.startswith("each module's input shape")]
        assert lines[i].endswith(f"params = {parts}")
        assert ("decoder" in lines[i + 1].split()) is column


def test_plan_reads_no_data_files(write_recipe, capsys, monkeypatch):
    from contsup_datasets import Synthetic

    def refuse(self, train):
        raise AssertionError("plan must not load data")

    monkeypatch.setattr(Synthetic, "load", refuse)
    assert main(["plan", str(write_recipe(small_recipe_text())), "--json"]) == 0


def test_plugins_and_list(capsys):
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = {p["name"] for p in data["plugins"]}
    assert "contsup_context" in names
    context = next(p for p in data["plugins"] if p["name"] == "contsup_context")
    assert {"kind": "context selector", "name": "contsup"} in context["registered"]
    assert main(["list", "context_selectors"]) == 0
    assert "R1E" in capsys.readouterr().out
    assert main(["list", "backbone"]) == 2
    assert "did you mean 'backbones'?" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["context_selectors", "objectives", "decoders", "partitioners", "datasets", "backbones"])
def test_list_shows_each_description_whole(kind, capsys):
    assert main(["list", kind]) == 0
    heads = [line for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    assert heads and all(line.endswith((".", ")")) for line in heads), heads  # no sentence cut at a line break
    if kind == "context_selectors":
        assert "i evenly spaced intermediate features (Mi), or every feature (dense), each through its own adapter." in heads[0]


def test_usage_errors_exit_2_without_traceback(capsys):
    assert main(["trian", "x.toml"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "invalid choice" in err


def test_observers_are_called(small_recipe, tmp_path):
    from contsup import hookimpl
    from contsup.training.loop import Trainer
    from contsup.core.plugins import get_plugin_manager

    calls = []

    class Observer:
        @hookimpl
        def on_run_start(self, run):
            calls.append(("start", run.recipe.partition.modules))

        @hookimpl
        def on_epoch_end(self, run, epoch, metrics):
            calls.append(("epoch", epoch, metrics["epoch"]))

        @hookimpl
        def on_run_end(self, run, metrics):
            calls.append(("end", metrics["epoch"]))

    pm = get_plugin_manager(entry_points=False)
    pm.register(Observer(), name="observer")
    Trainer(small_recipe(epochs=2, train_size=16), tmp_path, hook=pm.hook, log=open("/dev/null", "w")).fit()
    assert calls == [("start", 4), ("epoch", 1, 1), ("epoch", 2, 2), ("end", 2)]

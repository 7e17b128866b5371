"""Every hook in contsup/hookspecs.py has a section in docs/plugins/hooks.md and a test here named
``test_hook_<name>``; each test runs that section's example plugin, so the examples work."""

from __future__ import annotations

import csv
import io
import json
import re
import textwrap
import types

import pytest
import torch

from contsup import hookspecs
from contsup.training.loop import Trainer
from contsup.model.network import build_network
from contsup.errors import RecipeError
from contsup.options import structure
from contsup.config.reading import tomllib
from contsup.testing import (
    check_backbone, check_dataset, check_decoder, check_method, check_objective, check_partitioner, check_selector, plugin_manager, registries, validate_recipe,
)
from contsup.types import Costs

from conftest import ROOT, small_recipe_text

HOOKS_MD = ROOT / "docs" / "plugins" / "hooks.md"
HOOKS = sorted(name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "contsup_spec"))


def sections() -> dict[str, str]:
    """``{heading: text}`` of every ``## heading`` in hooks.md."""
    parts = re.split(r"^## (.+)$", HOOKS_MD.read_text(), flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def example(hook: str) -> types.ModuleType:
    """The hook section's example, imported as a plugin module."""
    (code,) = re.findall(r"```python\n(.*?)```", sections()[hook], flags=re.S)
    module = types.ModuleType(f"hooks_md_{hook}")
    exec(compile(code, f"{HOOKS_MD}:{hook}", "exec"), module.__dict__)
    return module


def train(recipe, tmp_path, *plugins):
    """One short run of ``recipe`` with ``plugins`` observing it; returns the metrics."""
    pm = plugin_manager(*plugins)
    return Trainer(recipe, tmp_path, hook=pm.hook, log=io.StringIO()).fit()


def test_every_hook_has_a_section_and_a_test():
    assert len(HOOKS) == 11
    documented = sections()
    tests = {name for name in globals() if name.startswith("test_hook_")}
    for hook in HOOKS:
        assert hook in documented, f"docs/plugins/hooks.md has no '## {hook}' section"
        assert f"test_hook_{hook}" in tests, f"hook {hook} has no test_hook_{hook} in tests/test_hookspecs.py"


def test_every_hook_section_names_a_hook_and_shows_its_signature():
    for heading, text in sections().items():
        if heading.startswith("register_") or heading.startswith("on_"):
            assert heading in HOOKS, f"hooks.md documents '{heading}', which is no hook"
            spec = getattr(hookspecs, heading)
            args = ", ".join(spec.__code__.co_varnames[: spec.__code__.co_argcount])
            assert f"```\n{heading}({args})\n```" in text, f"hooks.md: '{heading}' must show its signature"
            assert "**When:**" in text and "```python" in text


def test_the_list_option_example_reads_and_reports_as_the_page_says():
    text = sections()["What every component provides"]
    module = types.ModuleType("hooks_md_list_option")
    (code,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    exec(compile(textwrap.dedent(code), f"{HOOKS_MD}:list option", "exec"), module.__dict__)
    assert structure(module.Options, {"stage_weights": [2, 1.5]}, "partition") == (module.Options(stage_weights=(2.0, 1.5)), [])
    messages = {
        '[1.0, "fast"]': 'partition.stage_weights: item 1: expected a number, got a string ("fast")',
        "3": "partition.stage_weights: expected a list of numbers, got an integer (3)",
        "[1.0, 0.0]": "partition.stage_weights: every weight must be > 0, got [1.0, 0.0]",
    }
    for toml, message in messages.items():
        table = tomllib.loads(f"stage_weights = {toml}")
        assert structure(module.Options, table, "partition") == (None, [message])
    for toml, message in list(messages.items())[:2]:
        assert f"`stage_weights = {toml}`" in text and message.split(": ", 1)[1] in text


def test_hook_register_backbones():
    plugin = example("register_backbones")
    assert registries(plugin).backbones.entry("tiny_cnn").plugin == plugin.__name__
    check_backbone(plugin.TinyCNN, input_shapes=[(3, 16, 16), (1, 8, 8)])
    text = small_recipe_text(backbone="tiny_cnn", modules=3)
    built = build_network(validate_recipe(text, plugin))
    assert [p.units for p in built.plans] == [1, 1, 1]
    assert built.unit_shapes == [(16, 16, 16), (16, 8, 8), (16, 4, 4)]
    assert built.network(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(RecipeError, match="4 is more than the 3 minimal units of backbone 'tiny_cnn'"):
        validate_recipe(small_recipe_text(backbone="tiny_cnn", modules=4), plugin)


def test_hook_register_partitioners():
    plugin = example("register_partitioners")
    splitter = plugin.FirstAlone(plugin.FirstAlone.Options())
    assert splitter.split(Costs.uniform(10), 1) == (10,)
    assert splitter.split(Costs.uniform(10), 4) == (1, 3, 3, 3)
    assert splitter.split(Costs.uniform(10), 10) == (1,) * 10
    check_partitioner(plugin.FirstAlone)
    text = small_recipe_text(modules=4).replace("[partition]\n", '[partition]\nuse = "first_alone"\n')
    recipe = validate_recipe(text, plugin)
    assert [p.units for p in build_network(recipe).plans] == [1, 3, 3, 3]


def test_hook_register_context_selectors():
    plugin = example("register_context_selectors")
    check_selector(plugin.TwoBack, max_modules=12)
    recipe = validate_recipe(small_recipe_text(context="two_back", modules=5), plugin)
    assert [[str(s) for s in p.sources] for p in build_network(recipe).plans] == [[], [], ["h0"], ["h1"], ["h2"]]


def test_hook_register_objectives(tmp_path):
    plugin = example("register_objectives")
    check_objective(plugin.SmoothedCrossEntropy)
    text = small_recipe_text(modules=2, train_size=16) + '\n[objective]\nuse = "smoothed_ce"\nsmoothing = 0.2\n'
    recipe = validate_recipe(text, plugin)
    assert recipe.objective.options.smoothing == 0.2
    (metrics,) = train(recipe, tmp_path)
    assert metrics["train_loss"][0] > 0 and metrics["test_local_acc_pct"][0] is not None
    with pytest.raises(RecipeError, match=r"objective.smoothing: must be in \[0.0, 1.0\)"):
        validate_recipe(text.replace("0.2", "1.0"), plugin)


def test_hook_register_decoders(tmp_path):
    plugin = example("register_decoders")
    check_decoder(plugin.PixelMSE)
    recipe = validate_recipe(small_recipe_text(modules=3, train_size=16) + '\n[decoder]\nuse = "pixel_mse"\n', plugin)
    network = build_network(recipe).network
    assert [m.decoder is not None for m in network.blocks] == [True, True, False]
    assert network.blocks[0].weights == (0.5, 1.0)
    out = network.blocks[0].decoder(torch.randn(2, 16, 16, 16))
    assert out.shape == (2, 3, 16, 16)
    (metrics,) = train(recipe, tmp_path)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics["train_loss"])


def test_hook_register_methods(tmp_path):
    plugin = example("register_methods")
    assert registries(plugin).methods.entry("noisy_head").plugin == plugin.__name__
    check_method(plugin.NoisyHead, modules=(3,))
    text = small_recipe_text(modules=3, train_size=16) + "\n[noisy_head]\nstd = 0.5\n"
    recipe = validate_recipe(text, plugin)
    assert recipe.method.use == "noisy_head"
    network = build_network(recipe).network.train()
    assert [m.part is not None for m in network.blocks] == [True, True, False]
    h = torch.zeros(2, 16, 16, 16)
    assert not torch.equal(network.blocks[0].feature(h), h)  # the head reads h with noise
    assert torch.equal(network.blocks[0].eval().feature(h), h)
    (metrics,) = train(recipe, tmp_path)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics["train_loss"])
    assert validate_recipe(text.replace("0.5", "0.0"), plugin).method is None  # inactive: plain greedy
    with pytest.raises(RecipeError, match="noisy_head.std: must be >= 0"):
        validate_recipe(text.replace("0.5", "-1.0"), plugin)


def test_hook_register_datasets(tmp_path):
    plugin = example("register_datasets")
    stripes = plugin.Stripes(plugin.Stripes.Options(size=8, samples=32))
    check_dataset(stripes)
    x, y = stripes.load(train=True)[0]
    assert x.shape == (1, 8, 8) and y.item() in (0, 1)
    assert len(stripes.load(train=False)) == 32
    text = small_recipe_text(modules=2).replace(
        '[data]\nuse = "synthetic"\nshape = [3, 16, 16]\ntrain_size = 64\ntest_size = 32\n', '[data]\nuse = "stripes"\nsize = 8\nsamples = 32\n'
    )
    recipe = validate_recipe(text, plugin)
    assert recipe.dataset.use == "stripes"
    (metrics,) = train(recipe, tmp_path)
    assert 0 <= metrics["test_error_pct"] <= 100


def test_hook_register_loggers(tmp_path):
    plugin = example("register_loggers")
    assert registries(plugin).loggers.entry("jsonlines").plugin == plugin.__name__
    text = small_recipe_text(epochs=2, modules=2, train_size=16) + '\n[log]\nuse = ["jsonlines"]\n\n[log.jsonlines]\nfile = "e.jsonl"\n'
    recipe = validate_recipe(text, plugin)
    assert [c.use for c in recipe.loggers] == ["jsonlines"] and recipe.loggers[0].options.file == "e.jsonl"
    metrics = train(recipe, tmp_path, plugin)
    lines = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert lines == [{"epoch": m["epoch"], "test_error_pct": m["test_error_pct"], "lr": m["lr"]} for m in metrics]
    with pytest.raises(RecipeError, match=r"log.use: unknown logger 'jsonline'; did you mean 'jsonlines'\?"):
        validate_recipe(text.replace('["jsonlines"]', '["jsonline"]'), plugin)


def test_hook_on_run_start(small_recipe, tmp_path, capsys):
    train(small_recipe(modules=3, train_size=16, context="R1E"), tmp_path, example("on_run_start"))
    assert "small: 3 modules on cpu; sources: - | x, h0 | x, h1" in capsys.readouterr().out


def test_hook_on_epoch_end(small_recipe, tmp_path):
    train(small_recipe(epochs=2, modules=2, train_size=16), tmp_path, example("on_epoch_end"))
    with open(tmp_path / "test_error.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["epoch", "test_error_pct"] and [r[0] for r in rows[1:]] == ["1", "2"]


def test_hook_on_run_end(small_recipe, tmp_path, capsys):
    (metrics,) = train(small_recipe(modules=2, train_size=16), tmp_path, example("on_run_end"))
    assert f"small: {metrics['test_error_pct']:.2f}% test error after 1 epochs" in capsys.readouterr().out

"""Backbones: the CIFAR ResNets (registered in timm) and timm ResNets, split into units that
compose back into the original network."""

from __future__ import annotations

import io
import math

import pytest
import timm
import torch
from torch import nn

from contsup.types import Source
from contsup_timm import CIFAR_BACKBONES, TimmResNet


@pytest.mark.parametrize("depth, params", [(20, 0.27e6), (32, 0.47e6), (56, 0.86e6), (110, 1.73e6)])
def test_cifar_resnets_are_in_timms_registry(depth, params):
    model = timm.create_model(f"cifar_resnet{depth}", num_classes=10)
    assert abs(sum(p.numel() for p in model.parameters()) - params) / params < 0.01
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("cls", CIFAR_BACKBONES, ids=lambda c: c.name)
def test_cifar_units_compose_to_the_network(cls):
    torch.manual_seed(0)
    parts = cls(cls.Options()).build((3, 32, 32), 10)
    depth = cls.depth
    assert len(parts.units) == 1 + 3 * (depth - 2) // 6
    net = nn.Sequential(*parts.units, parts.head).eval()
    x = torch.randn(2, 3, 32, 32)
    h = x
    for unit in parts.units:
        h = unit(h)
    assert h.shape == (2, 64, 8, 8)
    assert net(x).shape == (2, 10)


def test_timm_resnet_by_name_splits_into_stem_and_blocks():
    torch.manual_seed(0)
    preset = TimmResNet.resolve_name("resnet18")
    assert preset == {"model": "resnet18"} and TimmResNet.resolve_name("vit_base_patch16_224") is None
    parts = TimmResNet(TimmResNet.Options(**preset)).build((3, 64, 64), 7)
    assert len(parts.units) == 1 + 8
    torch.manual_seed(1)
    reference = timm.create_model("resnet18", num_classes=7).eval()
    torch.manual_seed(1)
    parts = TimmResNet(TimmResNet.Options(**preset)).build((3, 64, 64), 7)
    net = nn.Sequential(*parts.units, parts.head).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(net(x), reference(x), atol=1e-5)


def test_unknown_timm_model_is_a_clear_error():
    with pytest.raises(ValueError, match="did you mean 'resnet18'"):
        TimmResNet.Options(model="resnet181")


# -- ImageNet-scale ResNets --------------------------------------------------------------------

IMAGENET_RECIPE = """
[run]
epochs = 1
device = "cpu"
[data]
use = "synthetic"
shape = [3, {size}, {size}]
classes = 1000
train_size = 4
test_size = 2
batch_size = 2
[backbone]
use = "{model}"
[partition]
use = "{partition}"
modules = {k}
{measure}
[context]
use = "{context}"
{encoder}
"""

BLOCKS = {"resnet50": 16, "resnet101": 33, "resnet152": 50, "resnext50_32x4d": 16}


@pytest.mark.parametrize("model", sorted(BLOCKS))
def test_imagenet_resnets_build_at_224_without_pretrained_weights(model, registries):
    """timm ResNet-50/101/152 and ResNeXt-50 at 224 x 224 (1000 classes), K = 2 with R1E and the
    fast encoder, as recipes/imagenet/ uses them (memory-balanced, measured at batch 1, for
    ResNet-50; uniform for the rest, to stay fast): built offline, logits from a forward."""
    from contsup.config.recipe import loads_recipe
    from contsup.model.network import build_network

    balanced = model == "resnet50"
    text = IMAGENET_RECIPE.format(
        size=224, model=model, partition="memory_balanced" if balanced else "uniform", k=2,
        measure="measure_batch = 1" if balanced else "", context="R1E", encoder='encoder = "fast"',
    )
    torch.manual_seed(0)
    built = build_network(loads_recipe(text, registries, source="imagenet.toml"))
    assert len(built.unit_shapes) == 1 + BLOCKS[model] and built.unit_shapes[-1] == (2048, 7, 7)
    assert len(built.plans) == 2 and sum(p.units for p in built.plans) == 1 + BLOCKS[model]
    assert built.plans[1].sources == (Source.input(), Source.feature(0))
    with torch.no_grad():
        assert built.network.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize("context", ["none", "E", "R1", "R1E", "M1R1E", "M2R1E", "all"])
def test_imagenet_resnets_build_with_every_selector(context, registries):
    """ResNet-50 cut into K = 4 with every selector (the fast input encoder wherever x is a
    source): each module gets the selector's sources, and the network gives logits."""
    from contsup.config.recipe import loads_recipe
    from contsup.model.network import build_network

    encoder = 'encoder = "fast"' if context not in ("none", "R1") else ""
    text = IMAGENET_RECIPE.format(size=32, model="resnet50", partition="uniform", k=4, measure="", context=context, encoder=encoder)
    recipe = loads_recipe(text, registries, source="imagenet.toml")
    torch.manual_seed(0)
    built = build_network(recipe)
    selector = recipe.context.create()
    assert [p.sources for p in built.plans] == [tuple(selector.sources(l, 4)) for l in range(1, 5)]
    with torch.no_grad():
        assert built.network.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


@pytest.mark.slow
def test_an_imagenet_resnext_trains_greedily(registries, tmp_path):
    """One epoch (two greedy steps of every module) of ResNeXt-50 with R1E and the fast encoder at
    a small input: every module trains and evaluates with finite losses."""
    from contsup.config.recipe import loads_recipe
    from contsup.training.loop import Trainer

    text = IMAGENET_RECIPE.format(
        size=16, model="resnext50_32x4d", partition="uniform", k=4, measure="", context="R1E", encoder='encoder = "fast"'
    )
    recipe = loads_recipe(text, registries, source="imagenet.toml")
    trainer = Trainer(recipe, tmp_path, log=io.StringIO(), checkpoints=False)
    trainer.progress_stream = io.StringIO()
    assert trainer.network.num_modules == 4
    history = trainer.fit()
    assert len(history) == 1
    assert all(math.isfinite(v) for v in history[0]["train_loss"]) and math.isfinite(history[0]["test_loss"])

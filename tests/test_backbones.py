"""Backbones: the CIFAR ResNets (registered in timm) and timm ResNets, split into units that
compose back into the original network."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

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

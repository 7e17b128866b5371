"""contsup.testing.check_backbone and check_dataset: the built-in backbones and datasets pass,
and each way one breaks what the engine relies on is one line naming the shape or split."""

from __future__ import annotations

import attrs
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from contsup.testing import check_backbone, check_dataset, registries
from contsup.types import BackboneParts, DatasetInfo


def built(name: str):
    resolved = registries().backbones.resolve(name) if name.startswith(("cifar", "resnet")) else registries().datasets.resolve(name)
    return resolved.component(resolved.component.Options(**resolved.preset))


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18"])
def test_builtin_backbones_pass(name):
    check_backbone(built(name), input_shapes=[(3, 32, 32), (1, 8, 8)])


@pytest.mark.parametrize("name", ["synthetic", "digits"])
def test_builtin_datasets_pass(name):
    check_dataset(built(name))


class Small:
    """Two conv units and a linear head: the correct start of the broken ones below."""

    name = "small"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options=None):
        self.options = options

    def unit(self, c_in):
        return nn.Sequential(nn.Conv2d(c_in, 4, 3, padding=1), nn.ReLU())

    def build(self, input_shape, num_classes):
        units = [self.unit(input_shape[0]), self.unit(4)]
        return BackboneParts(units=units, head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes)))


def failure(check, component, **kwargs) -> str:
    with pytest.raises(AssertionError) as err:
        check(component, **kwargs)
    return str(err.value)


def test_a_correct_backbone_passes_and_the_random_state_is_left_alone():
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    check_backbone(Small)
    assert torch.equal(torch.rand(2), expected)


class InPlace(Small):
    def unit(self, c_in):
        return nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(c_in, 4, 3, padding=1))


class Shared(Small):
    def build(self, input_shape, num_classes):
        parts = super().build(input_shape, num_classes)
        return BackboneParts(units=[parts.units[0], parts.units[1], parts.units[1]], head=parts.head)


_KEPT = {}


class Cached(Small):
    def build(self, input_shape, num_classes):
        return _KEPT.setdefault(tuple(input_shape), super().build(input_shape, num_classes))


class Unseeded(Small):
    def build(self, input_shape, num_classes):
        parts = super().build(input_shape, num_classes)
        with torch.no_grad():
            parts.head[2].bias.fill_(float(torch.randint(0, 100, (1,), generator=torch.Generator().manual_seed(id(parts) % 997))))
        return parts


class WrongHead(Small):
    def build(self, input_shape, num_classes):
        parts = super().build(input_shape, num_classes)
        return BackboneParts(units=parts.units, head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes + 1)))


class Dead(Small):
    def build(self, input_shape, num_classes):
        parts = super().build(input_shape, num_classes)
        parts.units[0][0].spare = nn.Parameter(torch.zeros(2))  # registered, never used
        return parts


def test_broken_backbones_are_named():
    assert "x 3x32x32 (train mode): unit 0 changed its input in place" in failure(check_backbone, InPlace)
    assert "x 3x32x32: unit 1 shares parameters with a later unit or the head" in failure(check_backbone, Shared)
    assert "x 3x32x32: two calls of build share parameters" in failure(check_backbone, Cached)
    assert "x 3x32x32: two builds from the same seed differ" in failure(check_backbone, Unseeded)
    assert "x 3x32x32 (train mode): the head gave (4, 11); expected finite logits of shape (4, 10)" in failure(check_backbone, WrongHead)
    assert "unit 0's parameter 0.spare gets no gradient from the head's output" in failure(check_backbone, Dead)


class Points:
    """A correct dataset of 8 random 1x4x4 images in 3 classes; the broken ones change one thing."""

    name = "points"
    info_value = DatasetInfo((1, 4, 4), 3, mean=(0.0,), std=(1.0,))

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options=None):
        self.options = options

    def info(self):
        return self.info_value

    def items(self):
        g = torch.Generator().manual_seed(0)
        return torch.randn(8, 1, 4, 4, generator=g), torch.arange(8) % 3

    def load(self, train):
        return TensorDataset(*self.items())


class WrongShape(Points):
    info_value = DatasetInfo((1, 5, 5), 3, mean=(0.0,), std=(1.0,))


class LabelOutOfRange(Points):
    def items(self):
        x, y = super().items()
        return x, y + 1


class TwoMeans(Points):
    info_value = DatasetInfo((1, 4, 4), 3, mean=(0.0, 0.0), std=(1.0,))


def test_broken_datasets_are_named():
    check_dataset(Points)
    assert "the train split: item 0's x is (1, 4, 4) torch.float32; expected a finite float tensor of shape (1, 5, 5)" in failure(check_dataset, WrongShape)
    assert "the train split: item 2's y is tensor(3); expected an integer label in 0..2" in failure(check_dataset, LabelOutOfRange)
    assert "info() has mean (0.0, 0.0) and std (1.0,); expected one of each per channel (1)" in failure(check_dataset, TwoMeans)

"""Built-in backbones: CIFAR ResNet-20/32/56/110 and any timm ResNet by name.

Importing this package imports neither torch nor timm (listing the backbones needs neither):
building a backbone imports them, and ``contsup_timm.cifar_resnet``, which registers the CIFAR
ResNets in timm's own registry. If timm is already imported, this package registers them at once,
so ``import timm, contsup_timm`` then ``timm.create_model("cifar_resnet32")`` works as before.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import attrs

from contsup import ContsupError, hookimpl
from contsup.options import option
from contsup.types import BackboneParts, Shape
from contsup.suggest import did_you_mean

if "timm" in sys.modules:  # cheap now (torch and timm are loaded): register the CIFAR ResNets in timm
    from contsup_timm import cifar_resnet  # noqa: F401


class _CifarBackbone:
    """A CIFAR ResNet split into its stem and each residual block."""

    name = "cifar_resnet"
    depth = 32

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options: "_CifarBackbone.Options") -> None:
        self.options = options

    def build(self, input_shape: Shape, num_classes: int) -> BackboneParts:
        import timm

        from contsup_timm.cifar_resnet import CifarResNet  # registers cifar_resnet{20,32,56,110} in timm

        model = timm.create_model(f"cifar_resnet{self.depth}", num_classes=num_classes, in_chans=input_shape[0])
        assert isinstance(model, CifarResNet)
        return BackboneParts(units=[model.stem(), *model.blocks()], head=model.head())


def _cifar(depth: int) -> type:
    cls = type(
        f"CifarResNet{depth}Backbone",
        (_CifarBackbone,),
        {"name": f"cifar_resnet{depth}", "depth": depth, "__doc__": f"CIFAR ResNet-{depth}: {1 + 3 * (depth - 2) // 6} units."},
    )
    return cls


CIFAR_BACKBONES = tuple(_cifar(d) for d in (20, 32, 56, 110))
_CIFAR_NAMES = frozenset(cls.name for cls in CIFAR_BACKBONES)


@functools.lru_cache(maxsize=1)
def timm_resnet_names() -> tuple[str, ...]:
    """Every model timm defines in its ResNet family (resnet18, resnet50d, seresnext26d_32x4d, ...)."""
    import timm

    return tuple(timm.list_models(module="resnet"))


class TimmResNet:
    """Any timm ResNet: the stem (conv, BN, act, max-pool) then each residual block."""

    name = "timm"

    @attrs.frozen
    class Options:
        model: str = option(doc="a timm ResNet name, e.g. resnet18 (any name in timm's resnet module)")

        def __attrs_post_init__(self) -> None:
            if self.model not in timm_resnet_names():
                raise ValueError(f"model: '{self.model}' is not a timm ResNet; {did_you_mean(self.model, timm_resnet_names())}")

    examples = ("resnet18", "resnet34", "resnet50")

    @classmethod
    def resolve_name(cls, name: str) -> dict | None:
        """``use = "resnet18"`` means ``use = "timm", model = "resnet18"``."""
        if name in _CIFAR_NAMES:  # ours, never in timm's resnet module: no need to import timm to say so
            return None
        return {"model": name} if name in timm_resnet_names() else None

    def __init__(self, options: "TimmResNet.Options") -> None:
        self.options = options

    def build(self, input_shape: Shape, num_classes: int) -> BackboneParts:
        import timm
        from torch import nn

        try:
            model = timm.create_model(self.options.model, num_classes=num_classes, in_chans=input_shape[0])
        except Exception as exc:  # timm raises many kinds for unusable arguments
            raise ContsupError(f"backbone: timm could not build '{self.options.model}': {exc}") from None
        stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)
        blocks = [block for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in layer]
        head = nn.Sequential(model.global_pool, model.fc)
        return BackboneParts(units=[stem, *blocks], head=head)


@hookimpl
def register_backbones(register):
    for cls in CIFAR_BACKBONES:
        register(cls)
    register(TimmResNet)


def __getattr__(name: str) -> Any:
    """The network class (``from contsup_timm import CifarResNet``), which lives in
    ``contsup_timm.cifar_resnet``, imported on first use (it needs torch and timm)."""
    if name == "CifarResNet":
        from contsup_timm.cifar_resnet import CifarResNet

        return CifarResNet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""timm models cut into minimal units and a head, family by family, from timm's own structure.

Each family's model class names its pieces the same way in every model of the family (a ViT's
``patch_embed`` and ``blocks``, a ConvNeXt's ``stem`` and ``stages``, an EfficientNet's ``blocks``
of stages), so one rule per family serves every model in it, with no per-model table. Where
timm's forward runs code of its own between submodules (a ViT's ``_pos_embed``, every family's
``forward_head``), a :class:`TimmPart` runs timm's own method on the part of the model it holds,
so the units in order, then the head, compute what the model computes, op for op
(tests/test_timm_split.py checks it over the families).
"""

from __future__ import annotations

import types
from typing import Any, Callable, Iterable, Sequence

import timm
import torch
from timm.models.convnext import ConvNeXt, ConvNeXtStage
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.regnet import RegNet, RegStage
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import unset_fake_temporarily

from contsup.errors import ContsupError
from contsup.types import BackboneParts


def _plain(value: Any) -> bool:
    """A setting a method may read (a flag, a size, a name), not a module, tensor or table."""
    if isinstance(value, (bool, int, float, str, type(None))):
        return True
    return isinstance(value, tuple) and all(_plain(v) for v in value)


class TimmPart(nn.Module):
    """Some of a timm model's submodules and parameters, under their timm names, with the model's
    settings (flags, sizes); ``forward`` runs ``steps`` in order, each a submodule or a method of
    the model's class. A method runs timm's own code with this part as ``self``, and any method it
    calls in turn is the class's too: the piece computes exactly what the model does there, while
    holding only its own parameters (so a module's optimizer sees only them)."""

    def __init__(self, model: nn.Module, steps: Sequence[str], modules: Iterable[str], parameters: Iterable[str] = ()) -> None:
        super().__init__()
        self.model_class = type(model)
        self.steps = tuple(steps)
        for key, value in vars(model).items():
            if not key.startswith("_") and key != "training" and _plain(value):
                setattr(self, key, value)
        for name in modules:
            self.add_module(name, getattr(model, name))
        for name in parameters:
            self.register_parameter(name, getattr(model, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = getattr(self, step)(x)
        return x

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            cls = self.__dict__.get("model_class")
            method = getattr(cls, name, None) if cls is not None and not hasattr(nn.Module, name) else None
            if not isinstance(method, types.FunctionType):
                raise
            return types.MethodType(method, self)

    def extra_repr(self) -> str:
        return f"{self.model_class.__name__}: {' -> '.join(self.steps)}"


# -- building ---------------------------------------------------------------------------------


def create(name: str, args: dict[str, Any]) -> nn.Module:
    """``timm.create_model(name, **args)``, a failure as one line. Inside a fake-tensor mode (the
    cost model's, which counts memory from shapes) the model is made on the meta device with the
    mode set aside, then given empty fake weights: timm reads its drop-path rates back from a
    tensor (``tolist``), which fake tensors cannot answer; shapes and structure are the same."""
    fake = detect_fake_mode()
    try:
        if fake is None:
            return timm.create_model(name, **args)
        with unset_fake_temporarily(), torch.device("meta"):
            model = timm.create_model(name, **args)
    except Exception as exc:  # timm raises many kinds for arguments a model does not take
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ContsupError(f"backbone: timm could not build '{name}' with {_args(args)}: {first}") from None
    return model.to_empty(device="cpu")


def check_input(model: nn.Module, name: str, input_shape: Sequence[int]) -> None:
    """On the meta device (where a recipe is validated: no data, no arithmetic), run the model on
    one input of ``input_shape`` so that an input the model cannot take (smaller than its total
    stride, not a multiple of its patch size) is one line before anything is built for real."""
    if next(model.parameters()).device.type != "meta":
        return
    training = model.training
    model.eval()  # shapes alone: a batch norm's training check on a 1x1 map is not the input's fault
    try:
        with torch.no_grad():
            model(torch.empty((2, *input_shape), device="meta"))
    except Exception as exc:  # a convolution's or a patch embedding's own complaint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        size = "x".join(str(d) for d in input_shape)
        raise ContsupError(f"backbone: '{name}' cannot take a {size} input: {first}") from None
    finally:
        model.train(training)


def _args(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


def _same(model: nn.Module, method: str, base: type) -> bool:
    """Whether ``model``'s class runs ``base``'s own ``method`` (a subclass may change it)."""
    return getattr(type(model), method) is getattr(base, method)


def _split_resnet(model: ResNet) -> BackboneParts:
    """The stem (conv, BN, act, max-pool), each residual block, global pool + (dropout +) fc."""
    stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)
    blocks = [block for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in layer]
    dropout = [nn.Dropout(model.drop_rate)] if model.drop_rate else []
    return BackboneParts(units=[stem, *blocks], head=nn.Sequential(model.global_pool, *dropout, model.fc))


def _split_vit(model: VisionTransformer) -> BackboneParts:
    """The stem (patch embedding, class/register tokens and position embedding, pre-norm), each
    transformer block, then the final norm, pooling and classifier (timm's ``forward_head``)."""
    children = [name for name, _ in model.named_children()]
    at = children.index("blocks")
    stem = TimmPart(
        model, ("patch_embed", "_pos_embed", "patch_drop", "norm_pre"), children[:at],
        [name for name, _ in model.named_parameters(recurse=False)],
    )
    head = TimmPart(model, ("norm", "forward_head"), children[at + 1 :])
    return BackboneParts(units=[stem, *model.blocks], head=head)


def _split_convnext(model: ConvNeXt) -> BackboneParts:
    """The stem, then per stage its downsampling layer (where it has one) and each block; the head
    is the pre-head norm and timm's ``forward_head`` (pool, norm, classifier)."""
    units: list[nn.Module] = [model.stem]
    for stage in model.stages:
        if not isinstance(stage, ConvNeXtStage) or not _same(stage, "forward", ConvNeXtStage):
            raise _Refused(f"its stage {type(stage).__name__} runs its own forward")
        if not isinstance(stage.downsample, nn.Identity):
            units.append(stage.downsample)
        units.extend(stage.blocks)
    return BackboneParts(units=units, head=TimmPart(model, ("norm_pre", "forward_head"), ("norm_pre", "head")))


def _split_efficientnet(model: EfficientNet) -> BackboneParts:
    """The stem (conv, BN+act), each block of each stage, the final 1x1 conv (BN+act) as the last
    unit; the head is timm's ``forward_head`` (pool, dropout, classifier)."""
    stem = TimmPart(model, ("conv_stem", "bn1"), ("conv_stem", "bn1"))
    blocks = [block for stage in model.blocks for block in stage]
    features = TimmPart(model, ("conv_head", "bn2"), ("conv_head", "bn2"))
    head = TimmPart(model, ("forward_head",), ("global_pool", "classifier"))
    return BackboneParts(units=[stem, *blocks, features], head=head)


def _split_mobilenetv3(model: MobileNetV3) -> BackboneParts:
    """The stem (conv, BN+act), each block of each stage; the head is timm's ``forward_head``
    (pool, 1x1 conv, norm, act, classifier)."""
    stem = TimmPart(model, ("conv_stem", "bn1"), ("conv_stem", "bn1"))
    blocks = [block for stage in model.blocks for block in stage]
    rest = [name for name, _ in model.named_children() if name not in ("conv_stem", "bn1", "blocks")]
    return BackboneParts(units=[stem, *blocks], head=TimmPart(model, ("forward_head",), rest))


def _split_regnet(model: RegNet) -> BackboneParts:
    """The stem, each block of each stage (and the final conv, where the model has one); the head
    is timm's ``forward_head`` (pool, dropout, classifier)."""
    units: list[nn.Module] = [model.stem]
    for name, stage in model.named_children():
        if isinstance(stage, RegStage):
            if not _same(stage, "forward", RegStage):
                raise _Refused(f"its stage '{name}' runs its own forward")
            units.extend(stage.children())
    if not isinstance(model.final_conv, nn.Identity):
        units.append(model.final_conv)
    return BackboneParts(units=units, head=TimmPart(model, ("forward_head",), ("head",)))


# (family class, the splitter, the pieces of timm's forward it relies on)
SPLITTERS: tuple[tuple[type, Callable[[Any], BackboneParts], tuple[str, ...]], ...] = (
    (ResNet, _split_resnet, ("forward_features",)),
    (VisionTransformer, _split_vit, ("forward_features",)),
    (ConvNeXt, _split_convnext, ("forward_features",)),
    (EfficientNet, _split_efficientnet, ("forward_features",)),
    (MobileNetV3, _split_mobilenetv3, ("forward_features",)),
    (RegNet, _split_regnet, ("forward_features",)),
)


class _Refused(Exception):
    """A model of a family's class that the family's rule cannot split (why, in a few words)."""


def split_model(model: nn.Module, name: str, families: str) -> BackboneParts:
    """``model`` (timm's ``name``) as its minimal units and head; one line naming the families
    that split when its class is none of theirs, or changes the forward a family's rule follows."""
    for base, splitter, relies_on in SPLITTERS:
        if isinstance(model, base):
            changed = [m for m in relies_on if not _same(model, m, base)]
            try:
                if changed:
                    raise _Refused(f"it changes {base.__name__}'s {', '.join(changed)}")
                return splitter(model)
            except _Refused as why:
                raise ContsupError(
                    f"backbone: '{name}' ({type(model).__name__}) cannot be split into units: {why}; "
                    f"the families that split: {families}"
                ) from None
    raise ContsupError(
        f"backbone: '{name}' is timm's {type(model).__name__}, which contsup cannot split into units; "
        f"the families that split: {families}"
    )


__all__ = ["TimmPart", "create", "check_input", "split_model", "SPLITTERS"]

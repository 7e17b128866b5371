"""Built-in backbones: CIFAR ResNet-20/32/56/110 and timm's models of the families that split
into minimal units (ResNet, ViT and DeiT, ConvNeXt, EfficientNet, MobileNetV3, RegNet) by name.

Importing this package imports neither torch nor timm (listing the backbones needs neither):
building a backbone imports them, ``contsup_timm.split`` (which cuts a timm model into units) and
``contsup_timm.cifar_resnet``, which registers the CIFAR ResNets in timm's own registry. If timm
is already imported, this package registers them at once, so ``import timm, contsup_timm`` then
``timm.create_model("cifar_resnet32")`` works as before.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import attrs

from contsup import ContsupError, hookimpl
from contsup.options import at_least, in_range, option
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

# The families that split, each the timm modules (timm/models/<module>.py) defining its models:
# contsup_timm.split cuts each family's model class from its own structure.
FAMILIES: dict[str, tuple[str, ...]] = {
    "resnet": ("resnet",),
    "vit": ("vision_transformer", "deit"),
    "convnext": ("convnext",),
    "efficientnet": ("efficientnet",),
    "mobilenetv3": ("mobilenetv3",),
    "regnet": ("regnet",),
}
FAMILY_PATTERNS = {  # how each family's names read, for messages and docs
    "resnet": "resnet*, resnext*, seresnet*, ...",
    "vit": "vit_*, deit_*, deit3_*",
    "convnext": "convnext_*",
    "efficientnet": "efficientnet_*, tinynet_*, mobilenetv2_*, ...",
    "mobilenetv3": "mobilenetv3_*, lcnet_*, ...",
    "regnet": "regnetx_*, regnety_*, regnetv_*",
}


def families_line() -> str:
    """The families that split, as one clause for messages."""
    return "; ".join(f"{family} ({FAMILY_PATTERNS[family]})" for family in FAMILIES)


@functools.lru_cache(maxsize=None)
def family_names(family: str) -> tuple[str, ...]:
    """Every model timm defines in ``family`` (one of :data:`FAMILIES`)."""
    import timm

    return tuple(sorted({n for module in FAMILIES[family] for n in timm.list_models(module=module)}))


@functools.lru_cache(maxsize=1)
def timm_resnet_names() -> tuple[str, ...]:
    """Every model timm defines in its ResNet family (resnet18, resnet50d, seresnext26d_32x4d, ...)."""
    return family_names("resnet")


@functools.lru_cache(maxsize=1)
def splittable_names() -> dict[str, str]:
    """Every model name of every family that splits -> its family."""
    return {n: family for family in FAMILIES for n in family_names(family)}


def family_of(name: str) -> str | None:
    """The family ``name`` belongs to, None when it is in none that splits."""
    return splittable_names().get(name)


def unsplittable_message(model: str) -> str:
    """Why ``model`` cannot be the backbone: not a timm model at all, or one of a family that
    does not split (one line naming the families that do)."""
    import timm

    if timm.is_model(model):
        return f"'{model}' is a timm model contsup cannot split into units; the families that split: {families_line()}"
    return f"'{model}' is not a timm model of a family that splits; {did_you_mean(model, splittable_names())}"


_VIT_ONLY = "vit and deit models"


class TimmBackbone:
    """Any timm model of a family that splits: resnet, vit (and deit), convnext, efficientnet,
    mobilenetv3, regnet; each cut into its stem, every block, and its head.

    How each family splits (contsup_timm.split): a ResNet into its stem (conv, BN, act, max-pool)
    and each residual block; a ViT or DeiT into its stem (patch embedding, class and position
    tokens), each transformer block, and a head of the final norm, pooling and classifier; a
    ConvNeXt into its stem, each stage's downsampling layer and each block; an EfficientNet or
    MobileNetV3 into its stem, each block (and EfficientNet's final 1x1 convolution); a RegNet into
    its stem and each block. Every option besides ``model`` goes to ``timm.create_model``.
    """

    name = "timm"
    families: tuple[str, ...] = tuple(FAMILIES)

    @attrs.frozen
    class Options:
        model: str = option(doc="a timm model of a family that splits, e.g. resnet18, vit_tiny_patch16_224, convnext_tiny")
        img_size: int = option(0, doc=f"the input size a model is built for ({_VIT_ONLY}); 0: the dataset's", validator=at_least(0))
        patch_size: int = option(0, doc=f"patch side of the patch embedding ({_VIT_ONLY}, convnext's stem); 0: the model's", validator=at_least(0))
        embed_dim: int = option(0, doc=f"token width ({_VIT_ONLY}); 0: the model's", validator=at_least(0))
        depth: int = option(0, doc=f"number of transformer blocks ({_VIT_ONLY}); 0: the model's", validator=at_least(0))
        num_heads: int = option(0, doc=f"attention heads per block ({_VIT_ONLY}); 0: the model's", validator=at_least(0))
        mlp_ratio: float = option(0.0, doc=f"MLP width / token width ({_VIT_ONLY}); 0: the model's", validator=at_least(0.0))
        depths: tuple[int, ...] = option((), doc="blocks per stage (convnext); []: the model's")
        dims: tuple[int, ...] = option((), doc="channels per stage (convnext); []: the model's")
        drop_path_rate: float = option(0.0, doc="stochastic depth: the largest rate, reached at the last block", validator=in_range(0.0, 1.0))
        args: dict[str, Any] = option(
            attrs.Factory(dict),
            doc="any other keyword timm.create_model takes for this model, as a table, e.g. "
            "{ class_token = false, global_pool = \"avg\" }",
        )

        def __attrs_post_init__(self) -> None:
            family = family_of(self.model)
            if family is None:
                raise ValueError(f"model: {unsplittable_message(self.model)}")

    examples = (
        "resnet18", "resnet34", "resnet50", "vit_tiny_patch16_224", "vit_small_patch16_224", "deit_tiny_patch16_224",
        "convnext_tiny", "efficientnet_b0", "mobilenetv3_small_100", "regnety_016",
    )

    @classmethod
    def resolve_name(cls, name: str) -> dict | None:
        """``use = "resnet18"`` means ``use = "timm", model = "resnet18"`` (any name of the families)."""
        if name in _CIFAR_NAMES:  # ours, never in timm's families: no need to import timm to say so
            return None
        family = family_of(name)
        return {"model": name} if family in cls.families else None

    def __init__(self, options: "TimmBackbone.Options") -> None:
        self.options = options

    def model_args(self, input_shape: Shape, num_classes: int) -> dict[str, Any]:
        """The keywords ``timm.create_model`` gets: the dataset's classes and channels, the options
        that are set, and (for a ViT or DeiT) the dataset's image size unless ``img_size`` is set."""
        o = self.options
        args: dict[str, Any] = {"num_classes": num_classes, "in_chans": input_shape[0]}
        if family_of(o.model) == "vit":
            args["img_size"] = o.img_size or tuple(input_shape[1:])
        elif o.img_size:
            args["img_size"] = o.img_size
        named = {
            "patch_size": o.patch_size, "embed_dim": o.embed_dim, "depth": o.depth, "num_heads": o.num_heads,
            "mlp_ratio": o.mlp_ratio, "depths": o.depths, "dims": o.dims, "drop_path_rate": o.drop_path_rate,
        }
        args.update({k: v for k, v in named.items() if v})
        taken = sorted(set(o.args) & (set(args) | {"model_name", "pretrained"}))
        if taken:
            raise ContsupError(f"backbone.args: {', '.join(taken)} cannot be set here; set them as backbone options, or leave them to the dataset")
        args.update(o.args)
        return args

    def build(self, input_shape: Shape, num_classes: int) -> BackboneParts:
        from contsup_timm.split import check_input, create, split_model

        model = create(self.options.model, self.model_args(input_shape, num_classes))
        check_input(model, self.options.model, input_shape)
        return split_model(model, self.options.model, families_line())


class TimmResNet(TimmBackbone):
    """Any timm ResNet: the stem (conv, BN, act, max-pool) then each residual block: the ``timm``
    backbone narrowed to timm's ResNet family (for code that builds ResNets directly)."""

    families = ("resnet",)

    @attrs.frozen
    class Options(TimmBackbone.Options):
        def __attrs_post_init__(self) -> None:
            if self.model not in timm_resnet_names():
                raise ValueError(f"model: '{self.model}' is not a timm ResNet; {did_you_mean(self.model, timm_resnet_names())}")


@hookimpl
def register_backbones(register):
    for cls in CIFAR_BACKBONES:
        register(cls)
    register(TimmBackbone)


def __getattr__(name: str) -> Any:
    """The network class (``from contsup_timm import CifarResNet``), which lives in
    ``contsup_timm.cifar_resnet``, imported on first use (it needs torch and timm)."""
    if name == "CifarResNet":
        from contsup_timm.cifar_resnet import CifarResNet

        return CifarResNet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

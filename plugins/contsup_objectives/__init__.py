"""Built-in local objectives: softmax cross-entropy and supervised contrastive, on the paper's
auxiliary classifier (in any of its published variants)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import attrs

from contsup import hookimpl
from contsup.options import at_least, greater_than, in_range, option
from contsup.types import HeadSpec

from contsup_objectives.supcon import NoPositivePairs, supcon_loss

if TYPE_CHECKING:  # annotations only: the heads (and torch) load when the first one is built
    import torch
    from torch import nn

# the variants contsup_objectives.heads.VARIANTS builds (tests/test_objectives.py keeps the two equal)
HeadVariant = Literal["0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f"]
HeadChoice = Literal[HeadVariant, "auglocal"]  # the recipe key: a variant, or AugLocal's head of later units

_HEAD_DOC = (
    "auxiliary head: <convs>c<fully connected layers>f (1c2f is the paper's, Table 6), or \"auglocal\": "
    "copies of the backbone's later units, pooled, then one linear layer (AugLocal, docs/objectives.md)"
)
_DEPTH_DOC = "head = \"auglocal\": later units in module 1's head (d); later modules get fewer, see pyramid"
_PYRAMID_DOC = (
    "head = \"auglocal\": how far the depth falls toward module K-1, linearly: 1 reaches one unit there, "
    "0 keeps d everywhere (module l gets max(1, round(d - (d-1) * pyramid * (l-1)/(K-2))))"
)


def _auglocal(spec: HeadSpec, out: int, options) -> "nn.Module":
    from contsup_objectives.auglocal import AugLocalHead

    return AugLocalHead(spec, out=out, depth=options.depth, pyramid=options.pyramid)


class _HeadsByPosition:
    """What the engine asks of an objective whose head may be AugLocal's: ``contsup plan`` lists
    its heads under ``plan_keys``, and the cost model measures a head built from later units once
    per position (``head_key``), not once per shape."""

    plan_keys = ("auglocal",)
    options: Any

    def head_key(self, spec: HeadSpec) -> tuple | None:
        return (spec.last_unit, spec.module, spec.num_modules) if self.options.head == "auglocal" else None


class CrossEntropy(_HeadsByPosition):
    """Softmax cross-entropy on an auxiliary classifier (the paper's "softmax" objective)."""

    name = "cross_entropy"

    @attrs.frozen
    class Options:
        head: HeadChoice = option("1c2f", doc=_HEAD_DOC)
        hidden: int = option(128, doc="width of the head's hidden fully connected layers", validator=at_least(1))
        depth: int = option(2, doc=_DEPTH_DOC, validator=at_least(1))
        pyramid: float = option(1.0, doc=_PYRAMID_DOC, validator=in_range(0.0, 1.0))

    def __init__(self, options: "CrossEntropy.Options") -> None:
        self.options = options

    def head(self, spec: HeadSpec) -> nn.Module:
        from contsup_objectives.heads import AuxClassifier

        if self.options.head == "auglocal":
            return _auglocal(spec, spec.num_classes, self.options)
        return AuxClassifier(spec, out=spec.num_classes, hidden=self.options.hidden, variant=self.options.head)

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(z, y)

    def predict(self, z: torch.Tensor) -> torch.Tensor:
        return z.argmax(dim=1)


class SupCon(_HeadsByPosition):
    """Supervised contrastive loss on L2-normalised embeddings (the paper's "contrast" objective);
    its head ends in a 128 -> ``dim`` layer instead of a classifier."""

    name = "supcon"

    @attrs.frozen
    class Options:
        temperature: float = option(0.07, doc="temperature t of the similarities", validator=greater_than(0))
        base_temperature: float = option(0.07, doc="the loss is scaled by t / base_temperature", validator=greater_than(0))
        head: HeadChoice = option("1c2f", doc=_HEAD_DOC)
        hidden: int = option(128, doc="width of the head's hidden fully connected layers", validator=at_least(1))
        dim: int = option(128, doc="dimension of the embedding the loss compares", validator=at_least(1))
        depth: int = option(2, doc=_DEPTH_DOC, validator=at_least(1))
        pyramid: float = option(1.0, doc=_PYRAMID_DOC, validator=in_range(0.0, 1.0))

    def __init__(self, options: "SupCon.Options") -> None:
        self.options = options

    def head(self, spec: HeadSpec) -> nn.Module:
        from contsup_objectives.heads import AuxClassifier, Normalized

        o = self.options
        if o.head == "auglocal":
            return Normalized(_auglocal(spec, o.dim, o))
        return Normalized(AuxClassifier(spec, out=o.dim, hidden=o.hidden, variant=o.head))

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return supcon_loss(z, y, self.options.temperature, self.options.base_temperature)

    def predict(self, z: torch.Tensor) -> None:
        """An embedding predicts no label."""
        return None


@hookimpl
def register_objectives(register):
    register(CrossEntropy)
    register(SupCon)


_HEADS = ("VARIANTS", "AuxClassifier", "Normalized")


def __getattr__(name: str) -> Any:
    """The head classes (``from contsup_objectives import AuxClassifier``), which live in
    ``contsup_objectives.heads``, imported on first use (they need torch)."""
    if name in _HEADS:
        from contsup_objectives import heads

        return getattr(heads, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CrossEntropy", "SupCon", "supcon_loss", "NoPositivePairs"]

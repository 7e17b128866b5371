"""Built-in local objectives: cross-entropy on the paper's auxiliary classifier."""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from contsup import hookimpl
from contsup.options import at_least, option
from contsup.types import HeadSpec

from contsup_objectives.heads import AuxClassifier


class CrossEntropy:
    """Softmax cross-entropy on an auxiliary classifier (the paper's "softmax" objective)."""

    name = "cross_entropy"

    @attrs.frozen
    class Options:
        hidden: int = option(128, doc="width of the head's hidden fully connected layer", validator=at_least(1))

    def __init__(self, options: "CrossEntropy.Options") -> None:
        self.options = options

    def head(self, spec: HeadSpec) -> nn.Module:
        return AuxClassifier(spec, out=spec.num_classes, hidden=self.options.hidden)

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(z, y)

    def predict(self, z: torch.Tensor) -> torch.Tensor:
        return z.argmax(dim=1)


@hookimpl
def register_objectives(register):
    register(CrossEntropy)

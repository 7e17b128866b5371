"""A recipe's parts, built in one place for the network, the cost model and validation: the
dataset's info, the backbone's minimal units and head, and each unit's output shape.

Validation builds them on PyTorch's meta device (no memory, no initialisation cost) to count the
units; the cost model inside a fake-tensor mode (shapes only); the network for real. torch is
imported inside the functions: ``contsup list`` and ``--help`` read this layer and need none.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, ContextManager, Sequence

import attrs

from contsup.types import BackboneParts, DatasetInfo, Shape

if TYPE_CHECKING:
    from torch import nn


@attrs.frozen
class Parts:
    """The dataset's info, the backbone's units and head, and each unit's output shape (empty
    when not traced)."""

    info: DatasetInfo
    backbone: BackboneParts
    unit_shapes: list[Shape]

    @property
    def input_shape(self) -> Shape:
        return tuple(self.info.input_shape)

    @property
    def units(self) -> list[nn.Module]:
        return list(self.backbone.units)


def build_parts(backbone: Any, dataset: Any, within: ContextManager | None = None, trace: bool = True) -> Parts:
    """The parts of the chosen ``backbone`` for the chosen ``dataset``'s input, built (and traced)
    inside ``within`` (``torch.device("meta")``, a fake-tensor mode, a forked RNG; default: as
    they are, from the current RNG state)."""
    info = dataset.create().info()
    input_shape = tuple(info.input_shape)
    with within or contextlib.nullcontext():
        parts = backbone.create().build(input_shape, info.num_classes)
        shapes = trace_shapes(list(parts.units), input_shape) if trace else []
    return Parts(info, parts, shapes)


def trace_shapes(units: Sequence[nn.Module], input_shape: Shape) -> list[Shape]:
    """Each unit's output shape for one input of ``input_shape`` (C, H, W), in eval mode."""
    import torch

    shapes = []
    modes = [u.training for u in units]
    with torch.no_grad():
        h = torch.zeros((2, *input_shape))
        for unit in units:
            unit.eval()
            h = unit(h)
            shapes.append(tuple(h.shape[1:]))
    for unit, mode in zip(units, modes):
        unit.train(mode)
    return shapes


def too_many_modules(k: int, units: int, backbone: str) -> str | None:
    """The problem when K modules cannot be cut from the backbone's ``units`` minimal units."""
    if k <= units:
        return None
    return f"partition.modules: {k} is more than the {units} minimal units of backbone '{backbone}'; use 1..{units}"


__all__ = ["Parts", "build_parts", "trace_shapes", "too_many_modules"]

"""Building a recipe's parts: the backbone's units and head, each unit's output shape and the
dataset's info.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from contsup.config.recipe import Recipe
from contsup.model.components import trace_shapes
from contsup.types import DatasetInfo, Shape


def recipe_parts(recipe: Recipe, fake: FakeTensorMode | None = None) -> tuple[Any, list[Shape], DatasetInfo]:
    """The recipe's backbone parts, unit output shapes and dataset info (fresh, seeded weights).

    With ``fake``, the parts are built and traced inside that fake mode: fake weights, shapes
    alone, nothing allocated however large the network or its input (give the same mode to
    :class:`CostModel`)."""
    info = recipe.dataset.create().info()
    with torch.random.fork_rng(devices=[]), (fake or contextlib.nullcontext()):
        torch.manual_seed(recipe.run.seed)
        parts = recipe.backbone.create().build(tuple(info.input_shape), info.num_classes)
        shapes = trace_shapes(list(parts.units), tuple(info.input_shape))
    return parts, shapes, info


__all__ = ["recipe_parts"]

"""Building a recipe's parts: the backbone's units and head, each unit's output shape and the
dataset's info.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from contsup.config.recipe import Recipe
from contsup.config.parts import build_parts
from contsup.types import DatasetInfo, Shape


def recipe_parts(recipe: Recipe, fake: FakeTensorMode | None = None) -> tuple[Any, list[Shape], DatasetInfo]:
    """The recipe's backbone parts, unit output shapes and dataset info (fresh, seeded weights).

    With ``fake``, the parts are built and traced inside that fake mode: fake weights, shapes
    alone, nothing allocated however large the network or its input (give the same mode to
    :class:`CostModel`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.run.seed)
        parts = build_parts(recipe.backbone, recipe.dataset, within=fake)
    return parts.backbone, parts.unit_shapes, parts.info


__all__ = ["recipe_parts"]

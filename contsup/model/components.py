"""What a greedy network's modules are built from, shared by the network
(:mod:`contsup.model.network`) and the cost model (:mod:`contsup.model.memory`): each unit's output
shape, the component instances of a module's stage, and the adapter for a context source.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import attrs
import torch
from torch import nn

from contsup.adapters import paper_adapter
from contsup.types import NetworkLayout, Shape, Source
from contsup.config.recipe import Recipe
from contsup.protocols import ContextSelector, Decoder, Objective


def trace_shapes(units: Sequence[nn.Module], input_shape: Shape) -> list[Shape]:
    """Each unit's output shape (C, H, W) for one input of ``input_shape``."""
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


def takes_layout(selector: Any) -> bool:
    """Whether ``selector.sources`` takes the network's layout: ``sources(module, num_modules,
    layout)`` (a third parameter, or one named ``layout``); two-argument selectors never see it."""
    try:
        params = list(inspect.signature(selector.sources).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable: called the classic way
        return False
    if any(p.name == "layout" for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3


def selector_sources(selector: ContextSelector, module: int, num_modules: int, layout: NetworkLayout | None) -> tuple[Source, ...]:
    """Module ``module``'s sources from ``selector``, given ``layout`` when it takes one."""
    if takes_layout(selector):
        if layout is None:
            raise TypeError(f"context selector '{getattr(selector, 'name', '?')}' needs the network's layout")
        try:
            named = "layout" in inspect.signature(selector.sources).parameters
        except (TypeError, ValueError):
            named = False
        if named:
            return tuple(selector.sources(module, num_modules, layout=layout))
        return tuple(selector.sources(module, num_modules, layout))
    return tuple(selector.sources(module, num_modules))


def make_adapter(selector: ContextSelector, source: Source, source_shape: Shape, target_shape: Shape) -> nn.Module:
    """The selector's own adapter for ``source``, else the paper's M_E / M_R."""
    build = getattr(selector, "adapter", None)
    adapter = build(source, source_shape, target_shape) if build is not None else None
    if adapter is None:
        adapter = paper_adapter(source.is_input, source_shape, target_shape)
    return adapter


@attrs.frozen
class Components:
    """The component instances one module uses (shared by the modules of one stage)."""

    selector: ContextSelector
    objective: Objective
    decoder: Decoder | None


def module_components(recipe: Recipe, k: int) -> list[Components]:
    """For modules 1..k, the selector, objective and decoder of the recipe's stage holding it."""
    cache: dict[int, Components] = {}
    out = []
    for l in range(1, k + 1):
        stage = recipe.stage(l)
        key = id(stage) if recipe.stages else 0
        if key not in cache:
            cache[key] = Components(
                stage.context.create(),
                stage.objective.create(),
                stage.decoder.create() if stage.decoder is not None else None,
            )
        out.append(cache[key])
    return out


__all__ = ["trace_shapes", "takes_layout", "selector_sources", "make_adapter", "Components", "module_components"]

"""What a greedy network's modules are built from, shared by the network
(:mod:`contsup.model.network`) and the cost model (:mod:`contsup.model.memory`): each unit's output
shape, the component instances of a module's stage, and the adapter for a context source.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import attrs
from torch import nn

from contsup.adapters import paper_adapter
from contsup.types import HeadSpec, NetworkLayout, Shape, Source
from contsup.config.recipe import Recipe
from contsup.protocols import ContextSelector, Decoder, Objective


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


def last_uses(sources: Sequence[Sequence[Source]]) -> dict[int, int]:
    """For each feature h_j^c some module uses: the last (1-based) module that uses it."""
    out: dict[int, int] = {}
    for module, srcs in enumerate(sources, start=1):
        for s in srcs:
            if not s.is_input:
                out[s.index] = max(out.get(s.index, 0), module)
    return out


def training_method(recipe: Recipe) -> Any:
    """The recipe's active training method, built (None: plain greedy training)."""
    chosen = recipe.method if recipe.run.mode == "greedy" else None
    return chosen.create() if chosen is not None else None


def method_part(method: Any, spec: HeadSpec, objective: Objective) -> nn.Module | None:
    """The method's own part of the module ``spec`` describes (None: it has none)."""
    build = getattr(method, "part", None)
    return build(spec, objective) if build is not None else None


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
    for module in range(1, k + 1):
        stage = recipe.module_range(module)
        key = id(stage) if recipe.ranges else 0
        if key not in cache:
            cache[key] = Components(
                stage.context.create(),
                stage.objective.create(),
                stage.decoder.create() if stage.decoder is not None else None,
            )
        out.append(cache[key])
    return out


__all__ = ["training_method", "method_part", "last_uses", "takes_layout", "selector_sources", "make_adapter", "Components", "module_components"]

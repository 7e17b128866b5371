"""Plugin managers, registries and recipes for plugin authors' tests: the built-ins and the
plugins under test, and nothing else installed."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any, Sequence

from contsup.model.components import selector_sources
from contsup.model.network import check_sources as check_module_sources, network_layout as layout_of
from contsup.core.plugins import PluginInfo, PluginManager, get_plugin_manager
from contsup.config.recipe import Recipe, load_recipe, loads_recipe
from contsup.core.registry import Registries
from contsup.testing.report import instance
from contsup.types import NetworkLayout


# -- plugin managers -------------------------------------------------------------------------


def _origin(plugin: object, name: str) -> tuple[str, str, str, str]:
    """(plugin name, distribution, version, entry point) of an installed plugin, else its module."""
    module = getattr(plugin, "__name__", None)
    for ep in importlib.metadata.entry_points(group="contsup"):
        if module is not None and ep.value == module:
            dist = getattr(ep, "dist", None)
            return ep.name, getattr(dist, "name", "?"), getattr(dist, "version", "?"), ep.value
    return name, "(not installed)", "?", ""


def plugin_manager(*plugins: object) -> PluginManager:
    """The built-ins plus ``plugins`` (modules or objects with hook implementations), and no
    other installed plugin. Errors in your hooks are raised, not recorded."""
    pm = get_plugin_manager(entry_points=False)
    pm.strict = True
    for plugin in plugins:
        default = getattr(plugin, "__name__", None) or type(plugin).__name__
        name, distribution, version, entry_point = _origin(plugin, default)
        pm.register(plugin, name=name)
        pm.check_pending()  # a misspelt hook name is an error, not a silent no-op
        pm.info[name] = PluginInfo(name, distribution, version, builtin=False, entry_point=entry_point)
    return pm


def registries(*plugins: object) -> Registries:
    """The component registries of the built-ins plus ``plugins``."""
    return Registries.from_plugin_manager(plugin_manager(*plugins))


def validate_recipe(text: str, *plugins: object, source: str = "test.toml") -> Recipe:
    """Validate recipe TOML ``text`` against the built-ins plus ``plugins``; raises RecipeError."""
    return loads_recipe(text, registries(*plugins), source=source)


def recipe(recipe_or_path: Any, *plugins: object, overrides: Sequence[str] = ()) -> Recipe:
    """A validated recipe from a :class:`Recipe`, a path to a TOML file or TOML text (a string
    with a line break), with the built-ins plus ``plugins``; ``overrides`` as ``--set`` takes
    them (``'context.use="stage"'``). Raises RecipeError."""
    if isinstance(recipe_or_path, Recipe):
        if overrides:
            raise ValueError("overrides need a path or TOML text, not a Recipe")
        return recipe_or_path
    regs = registries(*plugins)
    if isinstance(recipe_or_path, str) and "\n" in recipe_or_path:
        if overrides:
            raise ValueError("overrides need a path; put the keys in the TOML text")
        return loads_recipe(recipe_or_path, regs)
    return load_recipe(Path(recipe_or_path), overrides, regs)


def network_layout(recipe_or_path: Any, *plugins: object, overrides: Sequence[str] = ()) -> NetworkLayout:
    """The :class:`~contsup.types.NetworkLayout` the recipe's selectors are given: every
    module's input and output shape, unit range and stage, from the recipe's split. Builds the
    backbone once on CPU (a forward pass of a batch of two to trace shapes), reads no data."""
    return layout_of(recipe(recipe_or_path, *plugins, overrides=overrides))


def _selector(selector_or_name: Any, *plugins: object) -> Any:
    if isinstance(selector_or_name, str):
        resolved = registries(*plugins).context_selectors.resolve(selector_or_name)
        return resolved.component(resolved.component.Options(**resolved.preset))
    return instance(selector_or_name)


def preview_sources(selector_or_name: Any, recipe_or_path: Any, *plugins: object) -> dict[int, tuple[str, ...]]:
    """The sources ``selector_or_name`` gives every module of the recipe's network, keyed by the
    1-based module, as ``contsup plan`` prints them (``"x"``, ``"hJ"``).

    The selector is a name as a recipe writes it (``"stage"``, ``"R1E"``, one of ``plugins``'
    names), a class (built with default options) or an instance; the recipe is a
    :class:`Recipe`, a path or TOML text. Every module is given this selector, whatever the
    recipe's ``[context]`` says; the answers are checked against the index convention as the
    engine checks them (a ``ContsupError`` names the module)."""
    selector = _selector(selector_or_name, *plugins)
    layout = network_layout(recipe_or_path, *plugins)
    k = layout.num_modules
    out = {}
    for module in range(1, k + 1):
        sources = selector_sources(selector, module, k, layout)
        check_module_sources(sources, module, k, selector)
        out[module] = tuple(str(s) for s in sources)
    return out

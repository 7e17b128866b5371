"""TOML recipes -> frozen attrs classes, with every problem collected into one error: the door
to :mod:`contsup.config` (the recipe's shape in :mod:`~contsup.config.schema`, reading files and
overrides in :mod:`~contsup.config.reading`, validation in :mod:`~contsup.config.validation`).

A recipe has one table per section. In a component table, ``use`` names the component and the
other keys are the section's own keys (e.g. ``batch_size`` in ``[data]``) or the component's
``Options``. ``extends = "base.toml"`` inherits another recipe; ``--set key.path=value``
overrides any key, the value parsed as a TOML literal (a bare word is taken as a string).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from contsup.config.reading import apply_overrides, is_sweep, load_with_extends, parse_toml
from contsup.config.schema import Recipe
from contsup.config.validation import build_recipe
from contsup.core.plugins import get_plugin_manager
from contsup.core.registry import Registries
from contsup.errors import RecipeError


def load_recipe(path: str | Path, overrides: Sequence[str] = (), registries: Registries | None = None) -> Recipe:
    """Read, merge, override and validate the recipe at ``path``."""
    if registries is None:
        registries = Registries.from_plugin_manager(get_plugin_manager())
    data = load_with_extends(Path(path))
    if is_sweep(data):
        raise RecipeError([
            f"{path}: a sweep file ([sweep] and [axes]), not a recipe; check every combination with: "
            f"contsup sweep {path} --dry-run"
        ])
    data, keys, problems = apply_overrides(data, overrides)
    try:
        recipe = build_recipe(data, str(path), registries, keys)
    except RecipeError as exc:  # a malformed --set is one more problem, reported with the rest
        raise RecipeError([*problems, *exc.problems]) from None
    if problems:
        raise RecipeError(problems)
    return recipe


def loads_recipe(text: str, registries: Registries, source: str = "<string>") -> Recipe:
    """Validate a recipe given as TOML text."""
    return build_recipe(parse_toml(text, source), source, registries)


__all__ = ["Recipe", "RecipeError", "load_recipe", "loads_recipe"]

"""The paths a recipe names, as a run records them: a run started from one folder and evaluated
from another must read the same data, so a new run writes its data paths made absolute (a
leading ``~`` expanded) into its ``recipe.toml``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from contsup.config.recipe import Recipe

PATH_NAMES = ("root",)  # a dataset option naming a folder or file, besides *_dir, *_root, *_path, *_file
PATH_SUFFIXES = ("_dir", "_root", "_path", "_file")


def path_options(options: Any) -> dict[str, str]:
    """``{name: value}`` of a dataset's options that name a path (``root``, ``*_dir``, ...) and are set."""
    if not attrs.has(type(options)):
        return {}
    out = {}
    for f in attrs.fields(type(options)):
        value = getattr(options, f.name)
        if (f.name in PATH_NAMES or f.name.endswith(PATH_SUFFIXES)) and isinstance(value, str) and value.strip():
            out[f.name] = value
    return out


def anchored(recipe: Recipe) -> Recipe:
    """``recipe`` with its dataset's path options absolute (relative ones start at the current
    folder, as the run reads them) and ``~`` expanded: what a run records."""
    options = recipe.dataset.options
    changes = {}
    for name, value in path_options(options).items():
        absolute = str(Path(value).expanduser().absolute())
        if absolute != value:
            changes[name] = absolute
    if not changes:
        return recipe
    return attrs.evolve(recipe, dataset=attrs.evolve(recipe.dataset, options=attrs.evolve(options, **changes)))


__all__ = ["path_options", "anchored"]

"""contsup: greedy local learning with context supply.

The Python API (:mod:`contsup.api`) is imported on first use, so ``import contsup`` (and the
command line's start-up) stays free of torch until something needs it::

    import contsup
    run = contsup.train("recipes/digits.toml", overrides=["run.epochs=1"])
"""

from __future__ import annotations

from typing import Any

from contsup.core.version import __version__
from contsup.errors import ContsupError, RecipeError
from contsup.hookspecs import hookimpl

_API = ("Run", "train", "load_recipe", "build_network", "evaluate", "load_model")
_TOOLS = ("predict",)  # contsup.tools.predict.predict: the tools layer, above the API's


def __getattr__(name: str) -> Any:
    """The API's names, imported from :mod:`contsup.api` (or their tool) when first asked for."""
    if name in _API:
        from contsup import api

        return getattr(api, name)
    if name in _TOOLS:
        from contsup.tools import predict

        return getattr(predict, name)
    raise AttributeError(f"module 'contsup' has no attribute {name!r}")


__all__ = ["ContsupError", "RecipeError", "hookimpl", "__version__", *_API, *_TOOLS]

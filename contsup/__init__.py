"""contsup: greedy local learning with context supply."""

from contsup.core.version import __version__
from contsup.errors import ContsupError, RecipeError
from contsup.hookspecs import hookimpl


def load_model(run_dir, map_location="cpu"):
    """Rebuild a finished run's network (adapters included) as one ``nn.Module`` in eval mode."""
    from contsup.training.rundir import load_model as _load

    return _load(run_dir, map_location=map_location)


__all__ = ["ContsupError", "RecipeError", "hookimpl", "load_model", "__version__"]

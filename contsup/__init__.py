"""contsup: greedy local learning with context supply."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("contsup")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

from contsup.errors import ContsupError, RecipeError  # noqa: E402
from contsup.hookspecs import hookimpl  # noqa: E402


def load_model(run_dir, map_location="cpu"):
    """Rebuild a finished run's network (adapters included) as one ``nn.Module`` in eval mode."""
    from contsup.training.rundir import load_model as _load

    return _load(run_dir, map_location=map_location)


__all__ = ["ContsupError", "RecipeError", "hookimpl", "load_model", "__version__"]

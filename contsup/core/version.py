"""The installed distribution's version: ``contsup.__version__`` re-exports it.

Its home is the lowest layer, so the training loop and the launchers can name the version at
import time without importing the facade (``contsup/__init__.py``) that sits above them.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("contsup")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]

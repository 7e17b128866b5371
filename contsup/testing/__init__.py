"""Helpers for plugin authors' own tests.

``plugin_manager`` and ``registries`` load the built-ins and your plugin, and nothing else
installed, so other plugins cannot change what a test sees. ``check_selector`` checks a context
selector against the engine's contract for every 1 <= l <= K <= 32 and raises an
``AssertionError`` naming the module and K of every problem it finds. ``network_layout`` builds
the :class:`~contsup.types.NetworkLayout` a recipe's selector is given, and ``preview_sources``
the sources a selector gives every module of a recipe's network, without the command line.
``greedy_steps`` builds a recipe's network with its greedy step and takes one step at a time, so a
training method's test can read the network between steps.
"""


from contsup.testing.plugins import network_layout, plugin_manager, preview_sources, recipe, registries, validate_recipe
from contsup.testing.methods import GreedySteps, greedy_steps
from contsup.testing.selectors import SHAPE_PROFILES, chain_layout, check_adapter, check_selector

__all__ = [
    "plugin_manager", "registries", "validate_recipe", "recipe", "network_layout", "preview_sources",
    "check_selector", "check_adapter", "chain_layout", "SHAPE_PROFILES", "greedy_steps", "GreedySteps",
]

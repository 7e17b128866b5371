"""Helpers for plugin authors' own tests.

``plugin_manager`` and ``registries`` load the built-ins and your plugin, and nothing else
installed, so other plugins cannot change what a test sees. ``check_selector``,
``check_partitioner``, ``check_objective``, ``check_decoder``, ``check_method``,
``check_backbone`` and ``check_dataset`` check a component against the engine's contract and
raise an ``AssertionError`` with one line per problem, naming where it broke (the module and K;
the K and the costs; the shape). ``network_layout`` builds the
:class:`~contsup.types.NetworkLayout` a recipe's selector is given, and ``preview_sources`` the
sources a selector gives every module of a recipe's network, without the command line.
``greedy_steps`` builds a recipe's network with its greedy step and takes one step at a time, so a
training method's test can read the network between steps. ``contsup.testing.strategies`` holds
hypothesis strategies (cost tables, K, splits, layouts); it
needs hypothesis, which this package does not import.
"""


from contsup.testing.plugins import network_layout, plugin_manager, preview_sources, recipe, registries, validate_recipe
from contsup.testing.backbones import check_backbone, check_dataset
from contsup.testing.methods import check_method
from contsup.testing.objectives import check_decoder, check_objective
from contsup.testing.partitioners import check_partitioner
from contsup.testing.steps import GreedySteps, greedy_steps
from contsup.testing.selectors import SHAPE_PROFILES, chain_layout, check_adapter, check_selector

__all__ = [
    "plugin_manager", "registries", "validate_recipe", "recipe", "network_layout", "preview_sources",
    "check_selector", "check_adapter", "chain_layout", "SHAPE_PROFILES",
    "check_partitioner", "check_objective", "check_decoder", "check_method", "check_backbone", "check_dataset",
    "greedy_steps", "GreedySteps",
]

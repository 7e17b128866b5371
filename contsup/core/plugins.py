"""The plugin manager: built-in plugins first, then the ``contsup`` entry-point group.

``CONTSUP_LOAD_PLUGINS`` (a comma-separated list of entry-point or distribution names) limits
which third-party plugins load; set it to an empty string to load none. Built-ins always load.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
from typing import Any

import attrs
import pluggy

from contsup import hookspecs
from contsup.core.version import __version__
from contsup.suggest import did_you_mean

ENTRY_POINT_GROUP = "contsup"
ALLOW_ENV = "CONTSUP_LOAD_PLUGINS"

BUILTIN_PLUGINS = (
    "contsup_timm",
    "contsup_partition",
    "contsup_context",
    "contsup_objectives",
    "contsup_decoders",
    "contsup_datasets",
    "contsup_methods",
    "contsup_tensorboard",
    "contsup_loggers",
)


@attrs.frozen
class PluginInfo:
    """Where a loaded plugin came from."""

    name: str
    distribution: str
    version: str
    builtin: bool
    entry_point: str = ""


class PluginManager(pluggy.PluginManager):
    """A pluggy manager that also remembers each plugin's origin and any load failures."""

    def __init__(self) -> None:
        super().__init__("contsup")
        self.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        self.load_errors: list[str] = []
        self.warnings: list[str] = []  # problems that leave every plugin usable (a misspelt allowlist entry)
        self.skipped: list[PluginInfo] = []  # installed but left out by CONTSUP_LOAD_PLUGINS
        self.strict = False  # raise a plugin's errors instead of recording them (authors' tests)


def _allowed() -> set[str] | None:
    raw = os.environ.get(ALLOW_ENV)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def get_plugin_manager(*, builtins: tuple[str, ...] = BUILTIN_PLUGINS, entry_points: bool = True) -> PluginManager:
    """A fresh plugin manager with the built-ins and the allowed third-party plugins loaded."""
    pm = PluginManager()
    for module_name in builtins:
        pm.register(importlib.import_module(module_name), name=module_name)
        pm.info[module_name] = PluginInfo(module_name, "contsup", __version__, builtin=True)
    if entry_points:
        _load_entry_points(pm)
    return pm


def load_error(name: str, entry_point: str, cause: str, distribution: str = "") -> str:
    """The one line reported for a third-party plugin that cannot be used, with how to skip it."""
    cause = " ".join(cause.split())  # a multi-line message (a SyntaxError's) stays one line
    return (
        f"Error loading plugin '{name}' (entry point {entry_point}): {cause} "
        f"(skip it with {ALLOW_ENV} naming the plugins to load, or uninstall {distribution or name})"
    )


def _cause(exc: Exception) -> str:
    cause = f"{type(exc).__name__}: {exc}".strip()
    match = re.search(r"unknown hook '(\w+)'", str(exc))
    if isinstance(exc, pluggy.PluginValidationError) and match:
        hooks = [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "contsup_spec")]
        cause = f"{type(exc).__name__}: unknown hook '{match[1]}'; {did_you_mean(match[1], hooks)}"
    return cause


def _load_entry_points(pm: PluginManager) -> None:
    allowed = _allowed()
    installed: list[str] = []  # entry-point and distribution names, what the allowlist may name
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        dist_name = getattr(dist, "name", None) or getattr(dist, "metadata", {}).get("Name", "") if dist else ""
        dist_version = getattr(dist, "version", "") if dist else ""
        installed += [ep.name, dist_name] if dist_name else [ep.name]
        if allowed is not None and ep.name not in allowed and dist_name not in allowed:
            pm.skipped.append(PluginInfo(ep.name, dist_name or "?", dist_version or "?", builtin=False, entry_point=ep.value))
            continue
        if pm.get_plugin(ep.name) is not None or ep.name in pm.info:
            pm.load_errors.append(
                f"Error loading plugin '{ep.name}' (entry point {ep.value}): the name '{ep.name}' "
                f"is already taken by another plugin; rename the entry point"
            )
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
            pm.check_pending()  # a misspelt hook name would otherwise be ignored without a word
        except Exception as exc:  # a broken third-party plugin must not break contsup
            if pm.get_plugin(ep.name) is not None:
                pm.unregister(name=ep.name)
            pm.load_errors.append(load_error(ep.name, ep.value, _cause(exc), dist_name))
            continue
        pm.info[ep.name] = PluginInfo(ep.name, dist_name or "?", dist_version or "?", builtin=False, entry_point=ep.value)
    if allowed:
        pm.warnings += _unknown_allowed(allowed, installed, pm)


def _unknown_allowed(allowed: set[str], installed: list[str], pm: PluginManager) -> list[str]:
    """One line per allowlist entry naming no installed plugin (a typo loads nothing, silently
    otherwise). Built-in names and "contsup" are not errors: built-ins always load."""
    known = {*installed, "contsup", *(name for name, info in pm.info.items() if info.builtin)}
    choices = list(dict.fromkeys(installed))
    lines = []
    for name in sorted(allowed - known):
        available = did_you_mean(name, choices) if choices else "no third-party plugin is installed"
        lines.append(f"{ALLOW_ENV}: '{name}' is not an installed plugin, so it loads nothing; {available}")
    return lines


def plugin_versions(pm: PluginManager, providers: dict[str, dict[str, str]]) -> dict[str, dict[str, Any]]:
    """``{plugin: {"distribution", "version", "builtin", "recipe"}}`` for the run directory: every
    loaded plugin, since any of them may have run code in the run (an adapter or helper another
    plugin's component uses, an observer); ``recipe`` is ``{table: name}`` for the components of
    the recipe it provides (see :meth:`contsup.config.recipe.Recipe.providers`), else empty."""
    return {
        name: {
            "distribution": info.distribution,
            "version": info.version,
            "builtin": info.builtin,
            "recipe": providers.get(name, {}),
        }
        for name, info in pm.info.items()
    }

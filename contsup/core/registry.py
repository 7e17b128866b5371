"""One registry per component kind, filled by the plugins' ``register_*`` hooks.

A component is a class with a ``name``, an ``Options`` attrs class and the method of its kind.
A class may also claim a family of names with ``resolve_name(name) -> dict | None`` (preset
options, e.g. ``"R1E"`` for the ``contsup`` selector) and list examples in ``examples``.
"""

from __future__ import annotations

import sys
from typing import Any, Iterator, Mapping

import attrs

from contsup.core.plugins import PluginManager, get_plugin_manager, load_error
from contsup.errors import PluginError
from contsup.suggest import did_you_mean

KINDS = {
    "backbones": "backbone",
    "partitioners": "partitioner",
    "context_selectors": "context selector",
    "objectives": "objective",
    "decoders": "decoder",
    "datasets": "dataset",
    "methods": "method",
    "loggers": "logger",
}


@attrs.frozen
class Entry:
    """A registered component class and the plugin that registered it."""

    component: type
    plugin: str


@attrs.frozen
class Resolved:
    """What a name in a recipe resolved to: the class, options the name presets, its plugin."""

    component: type
    preset: dict
    plugin: str


class UnknownName(LookupError):
    """An unknown component name; the message lists the choices, closest first."""


class Registry:
    """Named components of one kind; duplicate names are an error naming both plugins."""

    def __init__(self, kind: str, origins: Mapping[str, Any] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self.origins = origins if origins is not None else {}  # plugin -> PluginInfo, for messages

    def check(self, component: type, plugin: str) -> None:
        """Raise PluginError unless ``component`` has a ``name`` and an attrs ``Options`` class."""
        name = getattr(component, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin '{plugin}' registered a {self.kind} without a 'name': {component!r}")
        options = getattr(component, "Options", None)
        if options is None or not attrs.has(options):
            raise PluginError(
                f"plugin '{plugin}' registered {self.kind} '{name}' without an attrs 'Options' class"
            )

    def add(self, component: type, plugin: str) -> None:
        """Register ``component`` as provided by ``plugin``; PluginError if its name clashes."""
        self.check(component, plugin)
        clash = self.clash(component, plugin)
        if clash:
            raise PluginError(clash)
        self._entries[component.name] = Entry(component, plugin)

    def clash(self, component: type, plugin: str) -> str:
        """The one-line error if ``component`` would take a name this registry already resolves,
        else "". A name is taken when a component has it or a family's ``resolve_name`` claims it
        (``R1E``, ``resnet18``): exact names resolve first, so a new component with such a name
        would silently change what recipes using it mean. A new family claiming a taken name (its
        owner's name or examples) clashes too."""
        name = component.name
        for entry in self._entries.values():
            if entry.component.name == name:
                return self._twice(name, entry.plugin, "", plugin, "")
        for entry in self._entries.values():
            if _claims(entry.component, name):
                return self._twice(name, entry.plugin, self._family(entry.component), plugin, "")
        for entry in self._entries.values():
            for taken in (entry.component.name, *getattr(entry.component, "examples", ())):
                if _claims(component, taken):
                    return self._twice(taken, entry.plugin, "", plugin, self._family(component))
        return ""

    def _family(self, component: type) -> str:
        return f" as a name of its {self.kind} '{component.name}'"

    def _twice(self, name: str, first: str, first_how: str, second: str, second_how: str) -> str:
        return (
            f"{self.kind} '{name}' is registered twice: by plugin {self._label(first)}{first_how} and by plugin "
            f"{self._label(second)}{second_how}{self._remedy(first, second)}"
        )

    def _label(self, plugin: str) -> str:
        info = self.origins.get(plugin)
        return f"'{plugin}' ({info.distribution} {info.version})" if info is not None else f"'{plugin}'"

    def _remedy(self, *plugins: str) -> str:
        """How to get rid of a duplicate: drop the third-party plugin(s) involved."""
        third = [p for p in plugins if p in self.origins and not self.origins[p].builtin]
        if not third:
            return ""
        dists = list(dict.fromkeys(self.origins[p].distribution for p in third))
        which = "it" if len(dists) == 1 else "one"
        return f"; uninstall {' or '.join(dists)}, or leave {which} out with CONTSUP_LOAD_PLUGINS"

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, name: str) -> Entry:
        """The entry registered under exactly ``name``."""
        return self._entries[name]

    def names(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._entries)

    def choices(self) -> list[str]:
        """Registered names plus the examples of name families, for suggestions."""
        out = list(self._entries)
        for entry in self._entries.values():
            out.extend(getattr(entry.component, "examples", ()))
        return list(dict.fromkeys(out))

    def resolve(self, name: str) -> Resolved:
        """The component for ``name``: an exact name first, else a family that claims it."""
        if name in self._entries:
            entry = self._entries[name]
            return Resolved(entry.component, {}, entry.plugin)
        for entry in self._entries.values():
            resolver = getattr(entry.component, "resolve_name", None)
            if resolver is None:
                continue
            preset = resolver(name)
            if preset is not None:
                return Resolved(entry.component, dict(preset), entry.plugin)
        raise UnknownName(f"unknown {self.kind} '{name}'; {did_you_mean(name, self.choices())}")


def _claims(component: type, name: str) -> bool:
    """Whether ``component``'s name family (``resolve_name``) resolves ``name``."""
    resolver = getattr(component, "resolve_name", None)
    return resolver is not None and resolver(name) is not None


class Registries:
    """All registries, filled from a plugin manager's ``register_*`` hooks."""

    def __init__(self, plugins: Mapping[str, Any] | None = None) -> None:
        self.plugins: dict[str, Any] = dict(plugins or {})  # plugin name -> PluginInfo
        self.clashes: list[str] = []  # one line per component left out for a taken name
        for attr, kind in KINDS.items():
            setattr(self, attr, Registry(kind, self.plugins))

    backbones: Registry
    partitioners: Registry
    context_selectors: Registry
    objectives: Registry
    decoders: Registry
    datasets: Registry
    methods: Registry
    loggers: Registry

    @classmethod
    def from_plugin_manager(cls, pm: Any, *, keep_clashes: bool = False) -> "Registries":
        """Call every ``register_*`` hook implementation, remembering which plugin gave what.

        A third-party plugin whose hook raises, or that registers a class without ``name`` or
        ``Options``, is left out and reported in ``pm.load_errors``; built-ins must not fail.
        A component whose name is taken is a PluginError with one line per clash; with
        ``keep_clashes`` (``contsup plugins``, which must still list everything) it is left out,
        the first registered keeps the name, and the lines are kept in ``clashes``.
        """
        registries = cls(getattr(pm, "info", {}))
        found: list[tuple[str, Registry, type]] = []
        failed: set[str] = set()
        for attr in KINDS:
            registry: Registry = getattr(registries, attr)
            caller = getattr(pm.hook, f"register_{attr}")
            for impl in caller.get_hookimpls():
                plugin = impl.plugin_name
                components: list[type] = []
                try:
                    impl.function(register=components.append)
                    for component in components:
                        registry.check(component, plugin)
                except Exception as exc:
                    _third_party_failure(pm, registries, plugin, f"register_{attr}", exc)
                    failed.add(plugin)
                    continue
                found += [(plugin, registry, c) for c in components]
        for plugin, registry, component in found:
            if plugin in failed:
                continue
            try:
                registry.add(component, plugin)
            except PluginError as exc:
                registries.clashes.extend(exc.lines)
        if registries.clashes and not keep_clashes:
            raise PluginError(*registries.clashes)
        return registries

    def by_plugin(self) -> dict[str, list[tuple[str, str]]]:
        """``{plugin: [(kind, name), ...]}`` for listings."""
        out: dict[str, list[tuple[str, str]]] = {}
        for attr, kind in KINDS.items():
            registry: Registry = getattr(self, attr)
            for name in registry:
                out.setdefault(registry.entry(name).plugin, []).append((kind, name))
        return out


def _third_party_failure(pm: Any, registries: Registries, plugin: str, hook: str, exc: Exception) -> None:
    """Record a third-party plugin's failing ``register_*`` hook as a load error; re-raise for
    built-ins and for strict managers (a plugin author's own tests want the traceback)."""
    info = registries.plugins.get(plugin)
    errors = getattr(pm, "load_errors", None)
    if info is None or info.builtin or errors is None or getattr(pm, "strict", False):
        raise exc
    cause = str(exc) if isinstance(exc, PluginError) else f"{hook} raised {type(exc).__name__}: {exc}"
    errors.append(load_error(plugin, info.entry_point or plugin, cause, info.distribution))
    # left out entirely: none of its components, and none of its observers either
    pm.unregister(name=plugin)
    getattr(pm, "info", {}).pop(plugin, None)
    registries.plugins.pop(plugin, None)


def load_registries(keep_clashes: bool = False) -> tuple[PluginManager, Registries]:
    """The plugin manager (built-ins, then the allowed third-party plugins) and its registries,
    as every command and every torchrun rank starts; load problems are printed to stderr as
    warnings. A name clash stops the caller (PluginError) unless ``keep_clashes``: then it is in
    ``registries.clashes``."""
    pm = get_plugin_manager()
    registries = Registries.from_plugin_manager(pm, keep_clashes=keep_clashes)  # may add load errors
    for line in [*pm.warnings, *pm.load_errors]:
        print(f"warning: {line}", file=sys.stderr)
    return pm, registries

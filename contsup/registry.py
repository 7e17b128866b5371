"""One registry per component kind, filled by the plugins' ``register_*`` hooks.

A component is a class with a ``name``, an ``Options`` attrs class and the method of its kind.
A class may also claim a family of names with ``resolve_name(name) -> dict | None`` (preset
options, e.g. ``"R1E"`` for the ``contsup`` selector) and list examples in ``examples``.
"""

from __future__ import annotations

from typing import Any, Iterator

import attrs

from contsup.errors import PluginError
from contsup.suggest import did_you_mean

KINDS = {
    "backbones": "backbone",
    "partitioners": "partitioner",
    "context_selectors": "context selector",
    "objectives": "objective",
    "decoders": "decoder",
    "datasets": "dataset",
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

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def add(self, component: type, plugin: str) -> None:
        """Register ``component`` as provided by ``plugin``."""
        name = getattr(component, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin '{plugin}' registered a {self.kind} without a 'name': {component!r}")
        options = getattr(component, "Options", None)
        if options is None or not attrs.has(options):
            raise PluginError(
                f"plugin '{plugin}' registered {self.kind} '{name}' without an attrs 'Options' class"
            )
        if name in self._entries:
            first = self._entries[name].plugin
            raise PluginError(
                f"{self.kind} '{name}' is registered twice: by plugin '{first}' and by plugin '{plugin}'"
            )
        self._entries[name] = Entry(component, plugin)

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


class Registries:
    """All registries, filled from a plugin manager's ``register_*`` hooks."""

    def __init__(self) -> None:
        for attr, kind in KINDS.items():
            setattr(self, attr, Registry(kind))

    backbones: Registry
    partitioners: Registry
    context_selectors: Registry
    objectives: Registry
    decoders: Registry
    datasets: Registry

    @classmethod
    def from_plugin_manager(cls, pm: Any) -> "Registries":
        """Call every ``register_*`` hook implementation, remembering which plugin gave what."""
        registries = cls()
        for attr in KINDS:
            registry: Registry = getattr(registries, attr)
            caller = getattr(pm.hook, f"register_{attr}")
            for impl in caller.get_hookimpls():
                impl.function(register=lambda c, _p=impl.plugin_name, _r=registry: _r.add(c, _p))
        return registries

    def by_plugin(self) -> dict[str, list[tuple[str, str]]]:
        """``{plugin: [(kind, name), ...]}`` for listings."""
        out: dict[str, list[tuple[str, str]]] = {}
        for attr, kind in KINDS.items():
            registry: Registry = getattr(self, attr)
            for name in registry:
                out.setdefault(registry.entry(name).plugin, []).append((kind, name))
        return out

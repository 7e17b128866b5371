"""The recipe's loggers: ``[log] use = ["csv", "mlflow"]`` names logger components (registered
by plugins through ``register_loggers``), and a table ``[log.NAME]`` holds logger NAME's options.
``tensorboard = true`` is a synonym of naming ``"tensorboard"``.

Every problem is one line: an unknown name with the closest ones, options for a logger not
named, options a logger does not have, a package a logger needs that is not installed (with the
command that installs it).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Mapping, Sequence

import attrs

from contsup.core.registry import Registries, UnknownName
from contsup.options import structure
from contsup.suggest import did_you_mean

SYNONYMS = {"tensorboard": "tensorboard"}  # [log] key = true -> the logger it names


def split_tables(log: Any) -> tuple[Any, dict[str, Any]]:
    """``[log]`` without the tables inside it, and those tables (``[log.NAME]``: logger NAME's
    options); anything but a table comes back as it was."""
    if not isinstance(log, Mapping):
        return log, {}
    own = {k: v for k, v in log.items() if not isinstance(v, Mapping)}
    return own, {k: v for k, v in log.items() if isinstance(v, Mapping)}


def missing_modules(component: type) -> list[tuple[str, str]]:
    """The (module, install command) pairs of ``component.requires`` that cannot be imported here."""
    missing = []
    for module, install in getattr(component, "requires", ()):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module set to None
            found = False
        if not found:
            missing.append((module, install))
    return missing


def choose(
    use: Sequence[str], flags: Mapping[str, bool], tables: Mapping[str, Any], where: str, registries: Registries,
) -> tuple[list[tuple[str, type, Any, str]], list[str]]:
    """The loggers a recipe asks for, in order and each once, as (name, class, options,
    plugin), and the problems found. ``use``: ``[log] use``; ``flags``: the synonym keys'
    values (``tensorboard = true``), whose own validator reports a missing package;
    ``tables``: ``[log.NAME]`` tables; ``where``: ``"FILE: log"``."""
    problems: list[str] = []
    names = list(dict.fromkeys(use))
    by_flag = [SYNONYMS[key] for key, on in flags.items() if on and SYNONYMS[key] not in names]
    resolved: dict[str, Any] = {}
    for i, name in enumerate([*names, *by_flag]):
        try:
            resolved[name] = registries.loggers.resolve(name)
        except UnknownName as exc:
            problems.append(f"{where}.use: {exc}")
            continue
        if i >= len(names):
            continue  # its key's validator says what is missing
        for module, install in missing_modules(resolved[name].component):
            problems.append(
                f'{where}.use: "{name}" needs the \'{module}\' package, which is not installed; {install}, '
                f'or take "{name}" out of log.use'
            )
    for key in tables:
        if key not in resolved and key not in names:
            known = sorted(set(registries.loggers.names()))
            hint = (f'add "{key}" to log.use, or remove [log.{key}]' if key in known
                    else did_you_mean(key, known))
            problems.append(f"{where}.{key}: options of a logger that log.use does not name; {hint}")
    chosen = []
    for name, found in resolved.items():
        table = {**found.preset, **tables.get(name, {})}
        fields = {f.name for f in attrs.fields(found.component.Options)}
        for key in [k for k in table if k not in fields]:
            problems.append(f"{where}.{name}.{key}: unknown key for logger '{name}'; {did_you_mean(key, fields)}")
            del table[key]
        options, option_problems = structure(found.component.Options, table, f"{where}.{name}")
        problems += option_problems
        if options is not None:
            chosen.append((name, found.component, options, found.plugin))
    return chosen, problems


__all__ = ["split_tables", "choose", "missing_modules", "SYNONYMS"]

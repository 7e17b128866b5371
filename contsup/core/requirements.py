"""``run.requires``: the plugin distributions a recipe needs, checked before anything runs.

Each entry is a requirement string as pip writes it (``"contsup-geometric>=0.1"``). A recipe
whose requirements are not met gets one "missing required plugin" problem per requirement,
saying what is installed and what would fix it.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any, Mapping, Sequence

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from contsup.core.plugins import ALLOW_ENV, ENTRY_POINT_GROUP


def parse(text: str) -> Requirement:
    """``"dist>=1.0"`` -> Requirement; raises ValueError with a readable message."""
    try:
        requirement = Requirement(text)
    except InvalidRequirement as exc:
        first = str(exc).splitlines()[0]
        raise ValueError(f"'{text}' is not a requirement like \"contsup-geometric>=0.1\" ({first})") from None
    if requirement.url or requirement.marker or requirement.extras:
        raise ValueError(f"'{text}': write only a distribution name and versions, like \"contsup-geometric>=0.1\"")
    return requirement


def _satisfied(requirement: Requirement, version: str) -> bool:
    try:
        return requirement.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _has_entry_points(name: str) -> bool:
    try:
        points = importlib.metadata.distribution(name).entry_points
    except importlib.metadata.PackageNotFoundError:
        return False
    return any(ep.group == ENTRY_POINT_GROUP for ep in points)


def check_requirements(requires: Sequence[str], plugins: Mapping[str, Any], where: str) -> list[str]:
    """One problem per requirement that the loaded ``plugins`` (name -> PluginInfo) do not meet.

    ``where`` prefixes each problem (``"recipe.toml: run.requires"``).
    """
    loaded: dict[str, str] = {}
    for info in plugins.values():
        loaded.setdefault(canonicalize_name(info.distribution), info.version)
    problems = []
    for i, text in enumerate(requires):
        at = f"{where}[{i}]"
        try:
            requirement = parse(text)
        except ValueError as exc:
            problems.append(f"{at}: {exc}")
            continue
        name = canonicalize_name(requirement.name)
        need = f"missing required plugin '{text}'"
        install = f"pip install '{text}'"
        version = loaded.get(name) or _installed_version(requirement.name)
        if version is None:
            problems.append(f"{at}: {need}: {requirement.name} is not installed ({install})")
        elif not _satisfied(requirement, version):
            problems.append(
                f"{at}: {need}: {requirement.name} {version} is installed, which is not "
                f"{requirement.specifier} ({install})"
            )
        elif name not in loaded:
            allow = os.environ.get(ALLOW_ENV)
            if not _has_entry_points(requirement.name):
                why = f"it has no entry point in the '{ENTRY_POINT_GROUP}' group"
            elif allow is not None:
                why = f"{ALLOW_ENV}={allow!r} leaves it out"
            else:
                why = "it failed to load; see the warning above"
            problems.append(f"{at}: {need}: {requirement.name} {version} is installed but loads no contsup plugin ({why})")
    return problems

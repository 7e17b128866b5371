"""Registries: duplicates name both plugins; unknown names list the choices, closest first."""

from __future__ import annotations

import attrs
import pytest

from contsup.errors import PluginError
from contsup.core.registry import Registry, UnknownName


def component(name: str, **extra):
    @attrs.frozen
    class Options:
        pass

    return type(f"C_{name}", (), {"name": name, "Options": Options, **extra})


def test_duplicate_name_is_an_error_naming_both_plugins():
    registry = Registry("backbone")
    registry.add(component("net"), "first_plugin")
    with pytest.raises(PluginError) as err:
        registry.add(component("net"), "second_plugin")
    assert "first_plugin" in str(err.value) and "second_plugin" in str(err.value)
    assert "'net'" in str(err.value)


def test_unknown_name_lists_choices_closest_first():
    registry = Registry("backbone")
    for name in ("alpha", "resnet18", "resnet34", "zeta"):
        registry.add(component(name), "p")
    with pytest.raises(UnknownName) as err:
        registry.resolve("resnet19")
    message = str(err.value)
    assert "did you mean 'resnet18'?" in message
    choices = message.split("choices: ")[1].split(", ")
    assert choices[:2] == ["resnet18", "resnet34"]
    assert set(choices) == {"alpha", "resnet18", "resnet34", "zeta"}


def test_component_without_options_or_name_is_rejected():
    registry = Registry("objective")
    with pytest.raises(PluginError, match="without a 'name'"):
        registry.add(type("X", (), {}), "p")
    with pytest.raises(PluginError, match="Options"):
        registry.add(type("X", (), {"name": "x"}), "p")


def test_families_resolve_names_with_preset_options():
    family = component("fam", resolve_name=classmethod(lambda cls, n: {"size": int(n[3:])} if n.startswith("fam") and n[3:].isdigit() else None))
    registry = Registry("backbone")
    registry.add(family, "p")
    resolved = registry.resolve("fam12")
    assert resolved.component is family and resolved.preset == {"size": 12} and resolved.plugin == "p"
    assert registry.resolve("fam").preset == {}
    with pytest.raises(UnknownName):
        registry.resolve("famX")


def test_builtin_registries_hold_the_documented_components(registries):
    assert {"cifar_resnet20", "cifar_resnet32", "cifar_resnet56", "cifar_resnet110", "timm"} <= set(registries.backbones)
    assert "uniform" in registries.partitioners
    assert "contsup" in registries.context_selectors
    assert "cross_entropy" in registries.objectives
    assert {"digits", "synthetic"} <= set(registries.datasets)
    for name in ("none", "R0", "E", "R3", "R1E", "M1R1E", "M2R1E", "all", "resnet18"):
        registry = registries.backbones if name == "resnet18" else registries.context_selectors
        registry.resolve(name)


def family(name: str, prefix: str, examples: tuple[str, ...] = ()):
    """A component claiming every name ``prefix`` + digits."""
    claims = classmethod(lambda cls, n: {} if n.startswith(prefix) and n[len(prefix):].isdigit() else None)
    return component(name, resolve_name=claims, examples=examples)


def test_a_name_an_earlier_family_claims_is_taken():
    registry = Registry("context selector")
    registry.add(family("contsup", "R", examples=("R1",)), "builtin")
    with pytest.raises(PluginError) as err:
        registry.add(component("R1"), "third")
    assert str(err.value) == (
        "context selector 'R1' is registered twice: by plugin 'builtin' as a name of its context selector "
        "'contsup' and by plugin 'third'"
    )
    assert registry.resolve("R1").component.name == "contsup"  # recipes keep their meaning
    registry.add(component("ring"), "third")  # a name no family claims is fine
    assert registry.resolve("ring").plugin == "third"


def test_a_later_family_claiming_a_taken_name_is_a_clash():
    registry = Registry("backbone")
    registry.add(component("net3"), "first")
    with pytest.raises(PluginError, match="'net3' is registered twice: by plugin 'first' and by plugin 'second' as a name of its backbone 'nets'"):
        registry.add(family("nets", "net"), "second")
    registry.add(family("nets", "other"), "second")
    assert "nets" in registry

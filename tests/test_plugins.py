"""The plugin manager: built-ins, entry points (faked as pytest's own tests do), allowlist,
broken plugins and duplicate names."""

from __future__ import annotations

import importlib.metadata
import sys
import types

import attrs
import pytest

from contsup import hookimpl
from contsup.cli import main
from contsup.errors import PluginError
from contsup.plugins import BUILTIN_PLUGINS, get_plugin_manager
from contsup.registry import Registries


class FakeDist:
    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self.metadata = {"Name": name}


class FakeEntryPoint:
    def __init__(self, name: str, module: str, dist: FakeDist) -> None:
        self.name = name
        self.value = module
        self.group = "contsup"
        self.dist = dist

    def load(self):
        __import__(self.value)
        return sys.modules[self.value]


def make_plugin_module(name: str, selector_name: str = "ring") -> types.ModuleType:
    module = types.ModuleType(name)

    class Ring:
        """Every module gets the input."""

        name = selector_name

        @attrs.frozen
        class Options:
            pass

        def __init__(self, options):
            self.options = options

        def sources(self, module, num_modules):
            from contsup.types import Source

            return (Source.input(),) if module > 1 else ()

    @hookimpl
    def register_context_selectors(register):
        register(Ring)

    module.register_context_selectors = register_context_selectors
    return module


@pytest.fixture
def fake_entry_points(monkeypatch):
    """Install fake plugin modules and entry points; returns a function adding one."""
    points = []

    def entry_points(group=None, **kwargs):
        return [p for p in points if group is None or p.group == group]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)

    def add(name: str, module: types.ModuleType | None, dist: str = "contsup-ring", version: str = "1.2.3"):
        module_name = f"fake_{name}"
        if module is not None:
            monkeypatch.setitem(sys.modules, module_name, module)
        points.append(FakeEntryPoint(name, module_name, FakeDist(dist, version)))

    return add


def test_builtins_are_loaded_as_plugins():
    pm = get_plugin_manager(entry_points=False)
    for name in BUILTIN_PLUGINS:
        assert pm.get_plugin(name) is not None
        assert pm.info[name].builtin and pm.info[name].distribution == "contsup"


def test_entry_point_plugin_is_loaded_with_its_distribution(fake_entry_points, monkeypatch):
    monkeypatch.delenv("CONTSUP_LOAD_PLUGINS", raising=False)
    fake_entry_points("ring", make_plugin_module("fake_ring"))
    pm = get_plugin_manager()
    assert pm.info["ring"].distribution == "contsup-ring" and pm.info["ring"].version == "1.2.3"
    registries = Registries.from_plugin_manager(pm)
    assert registries.context_selectors.entry("ring").plugin == "ring"


@pytest.mark.parametrize("allow, loaded", [("", False), ("ring", True), ("contsup-ring", True), ("other", False)])
def test_allowlist_limits_third_party_plugins(fake_entry_points, monkeypatch, allow, loaded):
    fake_entry_points("ring", make_plugin_module("fake_ring"))
    monkeypatch.setenv("CONTSUP_LOAD_PLUGINS", allow)
    pm = get_plugin_manager()
    assert ("ring" in pm.info) is loaded
    assert all(pm.get_plugin(b) is not None for b in BUILTIN_PLUGINS)


def test_broken_plugin_gives_one_line_and_others_still_work(fake_entry_points, monkeypatch, capsys):
    monkeypatch.delenv("CONTSUP_LOAD_PLUGINS", raising=False)
    fake_entry_points("broken", None)  # its module does not exist
    fake_entry_points("ring", make_plugin_module("fake_ring"))
    pm = get_plugin_manager()
    assert len(pm.load_errors) == 1
    line = pm.load_errors[0]
    assert line.startswith("Error loading plugin 'broken' (entry point fake_broken): ModuleNotFoundError")
    assert "CONTSUP_LOAD_PLUGINS" in line and "\n" not in line
    assert "ring" in pm.info
    assert main(["plugins"]) == 0
    out, err = capsys.readouterr()
    assert "ring" in out and "Error loading plugin 'broken'" in err


def test_third_party_duplicate_name_is_an_error_naming_both(fake_entry_points, monkeypatch):
    monkeypatch.delenv("CONTSUP_LOAD_PLUGINS", raising=False)
    fake_entry_points("shadow", make_plugin_module("fake_shadow", selector_name="contsup"))
    pm = get_plugin_manager()
    with pytest.raises(PluginError) as err:
        Registries.from_plugin_manager(pm)
    assert "contsup_context" in str(err.value) and "shadow" in str(err.value)

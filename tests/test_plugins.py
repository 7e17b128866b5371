"""The plugin manager: built-ins, entry points (faked as pytest's own tests do), allowlist,
broken plugins and duplicate names."""

from __future__ import annotations

import importlib.metadata
import json
import sys
import types

import attrs
import pytest

from contsup import hookimpl
from contsup.cli import main
from contsup.errors import PluginError
from contsup.core.plugins import BUILTIN_PLUGINS, get_plugin_manager
from contsup.core.registry import Registries

from conftest import ROOT, small_recipe_text


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
    real = importlib.metadata.entry_points

    def entry_points(group=None, **kwargs):
        if group != "contsup":  # other libraries' entry points (timm's, triton's) stay real
            return real(**({"group": group} if group else {}), **kwargs)
        return [p for p in points if p.group == group]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)

    def add(name: str, module: types.ModuleType | None, dist: str = "contsup-ring", version: str = "1.2.3", value: str = ""):
        module_name = value or f"fake_{name}"
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
    assert [w.split("'")[1] for w in pm.warnings] == (["other"] if allow == "other" else [])  # names no plugin


def test_allowlist_entry_naming_no_plugin_is_a_warning(fake_entry_points, monkeypatch, capsys):
    fake_entry_points("ring", make_plugin_module("fake_ring"))
    fake_entry_points("geometric", make_plugin_module("fake_geometric", selector_name="geometric"), dist="contsup-geometric")
    monkeypatch.setenv("CONTSUP_LOAD_PLUGINS", "ring, contsup_context, geometrc")
    pm = get_plugin_manager()
    assert "ring" in pm.info and "geometric" not in pm.info
    choices = ["geometric", "contsup-geometric", "contsup-ring", "ring"]
    (line,) = pm.warnings  # a built-in's name is no typo: built-ins always load
    assert line.startswith("CONTSUP_LOAD_PLUGINS: 'geometrc' is not an installed plugin, so it loads nothing; "
                           "did you mean 'geometric'? choices: geometric, ")
    assert sorted(line.split("choices: ")[1].split(", ")) == sorted(choices)
    assert main(["plugins"]) == 0
    assert capsys.readouterr().err.splitlines() == [f"warning: {line}"]
    assert main(["plugins", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == [line]


def test_allowlist_warning_quoted_in_the_docs_is_real(fake_entry_points, monkeypatch, capsys):
    fake_entry_points("geometric", make_plugin_module("fake_geometric", selector_name="geometric"), dist="contsup-geometric")
    monkeypatch.setenv("CONTSUP_LOAD_PLUGINS", "geometrc")
    assert main(["plugins"]) == 0
    (line,) = capsys.readouterr().err.splitlines()
    assert line in (ROOT / "docs" / "plugins" / "index.md").read_text()


def test_allowlist_warning_without_third_party_plugins(fake_entry_points, monkeypatch):
    monkeypatch.setenv("CONTSUP_LOAD_PLUGINS", "geometric")
    assert get_plugin_manager().warnings == [
        "CONTSUP_LOAD_PLUGINS: 'geometric' is not an installed plugin, so it loads nothing; no third-party plugin is installed"
    ]


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


def test_duplicate_name_is_a_one_line_error_exit_2(fake_entry_points, monkeypatch, capsys, write_recipe):
    monkeypatch.delenv("CONTSUP_LOAD_PLUGINS", raising=False)
    fake_entry_points("shadow", make_plugin_module("fake_shadow", selector_name="contsup"), dist="contsup-shadow", version="2.0")
    recipe = write_recipe(small_recipe_text())
    for argv in (["plugins"], ["validate", str(recipe)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.splitlines() == [
            "error: context selector 'contsup' is registered twice: by plugin 'contsup_context' (contsup "
            f"{get_plugin_manager(entry_points=False).info['contsup_context'].version}) and by plugin 'shadow' "
            "(contsup-shadow 2.0); uninstall contsup-shadow, or leave it out with CONTSUP_LOAD_PLUGINS"
        ]
    monkeypatch.setenv("CONTSUP_LOAD_PLUGINS", "")  # the remedy it names works
    assert main(["validate", str(recipe)]) == 0


def _builtin_version() -> str:
    return get_plugin_manager(entry_points=False).info["contsup_context"].version


def test_a_name_a_builtin_family_resolves_cannot_be_taken(fake_entry_points, monkeypatch, capsys, write_recipe):
    """`use = "R1E"` means the built-in contsup selector; a plugin's "R1E" must not change that."""
    monkeypatch.delenv("CONTSUP_LOAD_PLUGINS", raising=False)
    fake_entry_points("shadow", make_plugin_module("fake_shadow", selector_name="R1E"), dist="contsup-shadow", version="2.0")
    recipe = write_recipe(small_recipe_text(context="R1E"))
    for argv in (["plan", str(recipe)], ["validate", str(recipe)]):
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.splitlines() == [
            f"error: context selector 'R1E' is registered twice: by plugin 'contsup_context' (contsup {_builtin_version()}) "
            "as a name of its context selector 'contsup' and by plugin 'shadow' (contsup-shadow 2.0); "
            "uninstall contsup-shadow, or leave it out with CONTSUP_LOAD_PLUGINS"
        ]


def test_a_name_no_family_claims_is_accepted(fake_entry_points, monkeypatch, capsys, write_recipe):
    monkeypatch.delenv("CONTSUP_LOAD_PLUGINS", raising=False)
    fake_entry_points("ring", make_plugin_module("fake_ring", selector_name="R1Ering"))
    registries = Registries.from_plugin_manager(get_plugin_manager())
    assert registries.context_selectors.resolve("R1Ering").plugin == "ring"
    assert registries.context_selectors.resolve("R1E").plugin == "contsup_context"
    assert main(["validate", str(write_recipe(small_recipe_text(context="R1Ering")))]) == 0


def test_a_backbone_named_like_a_timm_resnet_is_a_clash(fake_entry_points, monkeypatch):
    """The timm family takes every name in timm's resnet module: `use = "resnet18"` is timm's."""
    monkeypatch.delenv("CONTSUP_LOAD_PLUGINS", raising=False)
    module = types.ModuleType("fake_myres")
    backbone = type("MyResNet", (), {"name": "resnet18", "Options": attrs.frozen(type("Options", (), {}))})

    @hookimpl
    def register_backbones(register):
        register(backbone)

    module.register_backbones = register_backbones
    fake_entry_points("myres", module, dist="contsup-myres")
    with pytest.raises(PluginError) as err:
        Registries.from_plugin_manager(get_plugin_manager())
    assert str(err.value).startswith(
        "backbone 'resnet18' is registered twice: by plugin 'contsup_timm' (contsup "
        f"{_builtin_version()}) as a name of its backbone 'timm' and by plugin 'myres' (contsup-myres 1.2.3)"
    )


def test_plugins_lists_every_plugin_despite_a_clash(fake_entry_points, monkeypatch, capsys):
    """The diagnostic command shows everything, reports the clash and exits 2 so scripts notice."""
    monkeypatch.delenv("CONTSUP_LOAD_PLUGINS", raising=False)
    fake_entry_points("shadow", make_plugin_module("fake_shadow", selector_name="R1E"), dist="contsup-shadow", version="2.0")
    fake_entry_points("ring", make_plugin_module("fake_ring"))
    assert main(["plugins"]) == 2
    out, err = capsys.readouterr()
    lines = [" ".join(l.split()) for l in out.splitlines()]
    assert {line.split()[0] for line in lines[2:]} == {*BUILTIN_PLUGINS, "shadow", "ring"}  # after the header and its rule
    assert "shadow contsup-shadow 2.0 -" in lines  # its one component is left out
    assert "ring contsup-ring 1.2.3 context selectors: ring" in lines
    (line,) = err.splitlines()
    assert line.startswith("error: context selector 'R1E' is registered twice: by plugin 'contsup_context'")
    assert main(["plugins", "--json"]) == 2
    data = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in data["plugins"]] == [*BUILTIN_PLUGINS, "shadow", "ring"]
    assert data["errors"] == [line.removeprefix("error: ")]


def test_misspelt_hook_is_a_load_error_with_the_right_name(fake_entry_points, monkeypatch):
    monkeypatch.delenv("CONTSUP_LOAD_PLUGINS", raising=False)
    module = types.ModuleType("fake_typo")

    @hookimpl
    def register_context_selector(register):
        pass

    module.register_context_selector = register_context_selector
    fake_entry_points("typo", module)
    fake_entry_points("ring", make_plugin_module("fake_ring"))
    pm = get_plugin_manager()
    assert pm.load_errors == [
        "Error loading plugin 'typo' (entry point fake_typo): PluginValidationError: unknown hook "
        "'register_context_selector'; did you mean 'register_context_selectors'? choices: "
        + pm.load_errors[0].split("choices: ", 1)[1]
    ]
    assert "typo" not in pm.info and pm.get_plugin("typo") is None and "ring" in pm.info


def test_syntax_error_gives_one_line(fake_entry_points, monkeypatch, tmp_path):
    monkeypatch.delenv("CONTSUP_LOAD_PLUGINS", raising=False)
    (tmp_path / "fake_bad.py").write_text("def register_context_selectors(register:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fake_entry_points("bad", None, dist="contsup-bad")
    (line,) = get_plugin_manager().load_errors
    assert line.startswith("Error loading plugin 'bad' (entry point fake_bad): SyntaxError: ")
    assert "\n" not in line and line.endswith("(skip it with CONTSUP_LOAD_PLUGINS naming the plugins to load, or uninstall contsup-bad)")


def test_entry_point_names_are_unique(fake_entry_points, monkeypatch):
    monkeypatch.delenv("CONTSUP_LOAD_PLUGINS", raising=False)
    fake_entry_points("ring", make_plugin_module("fake_ring"))
    fake_entry_points("contsup_context", make_plugin_module("fake_contsup_context", selector_name="other"))
    pm = get_plugin_manager()
    assert pm.load_errors == [
        "Error loading plugin 'contsup_context' (entry point fake_contsup_context): the name 'contsup_context' "
        "is already taken by another plugin; rename the entry point"
    ]


@pytest.mark.parametrize(
    "hook_body, cause",
    [
        ("raise RuntimeError('no GPU here')", "register_context_selectors raised RuntimeError: no GPU here"),
        ("register(object)", "plugin 'flaky' registered a context selector without a 'name': <class 'object'>"),
    ],
)
def test_plugin_whose_hook_fails_is_left_out(fake_entry_points, monkeypatch, capsys, hook_body, cause):
    monkeypatch.delenv("CONTSUP_LOAD_PLUGINS", raising=False)
    module = types.ModuleType("fake_flaky")
    namespace = {"hookimpl": hookimpl}
    exec(f"@hookimpl\ndef register_context_selectors(register):\n    {hook_body}\n", namespace)
    exec("@hookimpl\ndef on_run_end(run, metrics):\n    raise AssertionError('must not be called')\n", namespace)
    module.register_context_selectors = namespace["register_context_selectors"]
    module.on_run_end = namespace["on_run_end"]
    fake_entry_points("flaky", module, dist="contsup-flaky")
    fake_entry_points("ring", make_plugin_module("fake_ring"))
    pm = get_plugin_manager()
    registries = Registries.from_plugin_manager(pm)
    assert pm.load_errors == [
        f"Error loading plugin 'flaky' (entry point fake_flaky): {cause} "
        "(skip it with CONTSUP_LOAD_PLUGINS naming the plugins to load, or uninstall contsup-flaky)"
    ]
    assert "ring" in registries.context_selectors and "flaky" not in pm.info
    assert pm.get_plugin("flaky") is None  # its observers are gone too
    assert main(["plugins"]) == 0
    out, err = capsys.readouterr()
    assert "ring" in out and "flaky" not in out and "Error loading plugin 'flaky'" in err and "Traceback" not in err


def test_plugins_lists_every_plugin_and_what_it_registered(fake_entry_points, monkeypatch, capsys):
    monkeypatch.delenv("CONTSUP_LOAD_PLUGINS", raising=False)
    module = make_plugin_module("fake_ring")

    @hookimpl
    def on_epoch_end(run, epoch, metrics):
        pass

    module.on_epoch_end = on_epoch_end
    fake_entry_points("ring", module)
    assert main(["plugins"]) == 0
    lines = [" ".join(l.split()) for l in capsys.readouterr().out.splitlines()]
    assert lines[0] == "plugin distribution registered"
    assert "contsup_decoders contsup " + get_plugin_manager(entry_points=False).info["contsup_decoders"].version + " decoders: infopro" in lines
    assert "ring contsup-ring 1.2.3 context selectors: ring; observers: on_epoch_end" in lines
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    ring = next(p for p in data["plugins"] if p["name"] == "ring")
    assert ring == {
        "name": "ring", "distribution": "contsup-ring", "version": "1.2.3", "builtin": False, "entry_point": "fake_ring",
        "hooks": ["on_epoch_end", "register_context_selectors"], "registered": [{"kind": "context selector", "name": "ring"}],
    }
    assert [p["name"] for p in data["plugins"]][: len(BUILTIN_PLUGINS)] == list(BUILTIN_PLUGINS)
    assert data["skipped"] == [] and data["errors"] == []


def test_plugins_says_which_plugins_the_allowlist_leaves_out(fake_entry_points, monkeypatch, capsys):
    fake_entry_points("ring", make_plugin_module("fake_ring"))
    monkeypatch.setenv("CONTSUP_LOAD_PLUGINS", "")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "not loaded (CONTSUP_LOAD_PLUGINS leaves it out): ring (contsup-ring 1.2.3)" in out
    assert main(["plugins", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == [
        {"name": "ring", "distribution": "contsup-ring", "version": "1.2.3", "entry_point": "fake_ring"}
    ]


def test_messages_quoted_in_the_docs_are_real(fake_entry_points, monkeypatch, tmp_path, capsys):
    """docs/plugins/index.md quotes these lines; they must be what contsup prints."""
    from contsup.core import requirements

    docs = (ROOT / "docs" / "plugins" / "index.md").read_text()
    monkeypatch.delenv("CONTSUP_LOAD_PLUGINS", raising=False)
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "digits_geometric.toml"
    # a plugin whose module has a typo in an import
    (tmp_path / "contsup_geometric.py").write_text("from contsup.type import Source\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "contsup_geometric", raising=False)
    fake_entry_points("geometric", None, dist="contsup-geometric", version="0.1.0", value="contsup_geometric")
    assert main(["plugins"]) == 0
    (line,) = capsys.readouterr().err.splitlines()
    assert line in docs
    # two plugins registering the same name
    monkeypatch.delitem(sys.modules, "contsup_geometric", raising=False)
    first = make_plugin_module("contsup_geometric", selector_name="geometric")
    monkeypatch.setitem(sys.modules, "contsup_geometric", first)
    fake_entry_points("geometric2", make_plugin_module("fake_geometric2", selector_name="geometric"), dist="contsup-geometric2", version="0.3.0")
    assert main(["plugins"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line in docs
    # a plugin taking a name of a built-in family (the docs show contsup 0.1.0)
    monkeypatch.setenv("CONTSUP_LOAD_PLUGINS", "shadow")
    fake_entry_points("shadow", make_plugin_module("fake_shadow", selector_name="R1E"), dist="contsup-shadow", version="2.0")
    assert main(["validate", str(ROOT / "recipes" / "digits.toml")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.replace(f"(contsup {_builtin_version()})", "(contsup 0.1.0)") in docs
    # run.requires: too old, then not installed
    recipe.write_text(small_recipe_text(context="geometric").replace("[run]\n", '[run]\nrequires = ["contsup-geometric>=0.2"]\n'))
    monkeypatch.setenv("CONTSUP_LOAD_PLUGINS", "geometric")
    assert main(["validate", "digits_geometric.toml"]) == 2
    assert capsys.readouterr().err.splitlines()[0] in docs
    recipe.write_text(small_recipe_text(context="R1E").replace("[run]\n", '[run]\nrequires = ["contsup-geometric>=0.1"]\n'))
    monkeypatch.setenv("CONTSUP_LOAD_PLUGINS", "")
    monkeypatch.setattr(requirements, "_installed_version", lambda name: None)
    assert main(["validate", "digits_geometric.toml"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line in docs


def test_plugins_json_lists_a_plugin_used_through_another(fake_entry_points, monkeypatch, tmp_path, capsys, write_recipe):
    """ring's selector gets its adapter for x from contsup_context, which the recipe never names."""
    monkeypatch.delenv("CONTSUP_LOAD_PLUGINS", raising=False)
    fake_entry_points("ring", make_plugin_module("fake_ring"))
    out_dir = tmp_path / "run"
    recipe = write_recipe(small_recipe_text(out_dir=str(out_dir), train_size=16, modules=2, context="ring"))
    assert main(["train", str(recipe)]) == 0
    capsys.readouterr()
    plugins = json.loads((out_dir / "plugins.json").read_text())["plugins"]
    assert list(plugins) == [*BUILTIN_PLUGINS, "ring"]
    assert plugins["ring"] == {"distribution": "contsup-ring", "version": "1.2.3", "builtin": False, "recipe": {"context": "ring"}}
    assert plugins["contsup_context"]["recipe"] == {}
    assert plugins["contsup_timm"]["recipe"] == {"backbone": "cifar_resnet20"}

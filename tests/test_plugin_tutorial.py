"""The plugin tutorials cannot rot: every code block of docs/plugins/tutorial-context-selector.md
is compared with the example package it builds (docs/plugins/examples/contsup-geometric, then,
after an ``<!-- example: contsup-stageskip -->`` line, the layout-aware contsup-stageskip) or run,
and so is every block of docs/plugins/tutorial-method.md (contsup-momentum); those packages are
installed for real (``pip install --target``) and used from the command line in subprocesses, as
a user would."""

from __future__ import annotations

import doctest
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from conftest import ROOT

TUTORIAL = ROOT / "docs" / "plugins" / "tutorial-context-selector.md"
METHOD_TUTORIAL = ROOT / "docs" / "plugins" / "tutorial-method.md"
EXAMPLES = ROOT / "docs" / "plugins" / "examples"
GEOMETRIC, STAGESKIP, MOMENTUM = "contsup-geometric", "contsup-stageskip", "contsup-momentum"
EXAMPLE = EXAMPLES / GEOMETRIC
# Each tutorial page and the example package its blocks belong to until a switch line says otherwise.
PAGES = {TUTORIAL: GEOMETRIC, METHOD_TUTORIAL: MOMENTUM}
ALL_EXAMPLES = (GEOMETRIC, STAGESKIP, MOMENTUM)
# What the reader types to set up, and what the tests do instead (see the `installed` fixture).
SETUP = {
    "mkdir contsup-geometric": "the fixture copies the example package into contsup-geometric/",
    "cd contsup-geometric": "commands run inside that copy",
    'pip install -e ".[test]"': "pip install --no-deps --no-build-isolation --target (the test's environment has pytest)",
    "cd ..": "the next example's commands run in its own copy",
    "mkdir contsup-stageskip": "the fixture copies the second example package into contsup-stageskip/",
    "cd contsup-stageskip": "its commands run inside that copy",
    "mkdir contsup-momentum": "the fixture copies the method tutorial's package into contsup-momentum/",
    "cd contsup-momentum": "its commands run inside that copy",
}
BLOCK = re.compile(r"(?:<!-- (?P<marker>[^\n]*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)^```", re.S | re.M)
# A line of its own naming the example package the blocks after it belong to (the first: geometric).
SWITCH = re.compile(r"^<!-- example: (?P<name>[\w-]+) -->$", re.M)


@attrs.frozen
class Block:
    marker: str
    lang: str
    body: str
    line: int
    example: str = GEOMETRIC
    page: Path = TUTORIAL

    @property
    def folder(self) -> Path:
        return EXAMPLES / self.example

    @property
    def module(self) -> str:
        return self.example.replace("-", "_")

    @property
    def kind(self) -> str:
        return re.split(r"[:,]", self.marker, maxsplit=1)[0].strip()

    @property
    def argument(self) -> str:
        return re.split(r"[:,]", self.marker, maxsplit=1)[1].strip() if re.search(r"[:,]", self.marker) else ""

    def __str__(self) -> str:
        return f"{self.page.name}, line {self.line} ({self.marker or 'no marker'})"


def page_blocks(page: Path = TUTORIAL) -> list[Block]:
    """Every code block of a tutorial page, each with the example package it belongs to."""
    text = page.read_text()
    switches = [(m.start(), m["name"]) for m in SWITCH.finditer(text)]
    blocks = []
    for m in BLOCK.finditer(text):
        owner = ([name for at, name in switches if at < m.start()] or [PAGES[page]])[-1]
        blocks.append(Block(m["marker"] or "", m["lang"], m["body"], text.count("\n", 0, m.start("body")), owner, page))
    return blocks


def tutorial_blocks(example: str | None = GEOMETRIC) -> list[Block]:
    """The code blocks of ``example``'s part of its tutorial (None: every block of every tutorial)."""
    blocks = [b for page in PAGES for b in page_blocks(page)]
    return [b for b in blocks if example is None or b.example == example]


def test_the_tutorial_has_both_examples():
    assert [m["name"] for m in SWITCH.finditer(TUTORIAL.read_text())] == [STAGESKIP]
    assert {b.example for b in page_blocks(TUTORIAL)} == {GEOMETRIC, STAGESKIP}
    assert all((EXAMPLES / name).is_dir() for name in (GEOMETRIC, STAGESKIP))


def test_the_method_tutorial_builds_its_own_example():
    assert not list(SWITCH.finditer(METHOD_TUTORIAL.read_text()))
    assert {b.example for b in page_blocks(METHOD_TUTORIAL)} == {MOMENTUM}
    assert (EXAMPLES / MOMENTUM).is_dir()


def example_files(example: str = GEOMETRIC) -> set[str]:
    """The example package's own files (not what building or testing it leaves behind)."""
    out = set()
    folder = EXAMPLES / example
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_file() and not any(p in ("__pycache__", ".pytest_cache", "build", "runs") or p.endswith(".egg-info") for p in rel.parts):
            out.add(rel.as_posix())
    return out


def matches_lines(expected: str, actual: str) -> str:
    """'' when the ``expected`` lines appear in ``actual`` in order, else what is missing.

    Whitespace runs compare equal; ``...`` on a line of its own skips any lines, and inside a
    line stands for any text. Lines not separated by ``...`` must follow each other directly.
    """

    def norm(line: str) -> str:
        return " ".join(line.split())

    def pattern(line: str) -> re.Pattern:
        return re.compile(".*".join(re.escape(part) for part in norm(line).split("...")) + r"\Z")

    have = [norm(l) for l in actual.splitlines()]
    groups: list[list[re.Pattern]] = [[]]
    for line in expected.strip("\n").splitlines():
        if line.strip() == "...":
            groups.append([])
        else:
            groups[-1].append(pattern(line))
    start = 0
    for group in filter(None, groups):
        for i in range(start, len(have) - len(group) + 1):
            if all(p.match(have[i + j]) for j, p in enumerate(group)):
                start = i + len(group)
                break
        else:
            return f"not found in order: {[p.pattern for p in group]}"
    return ""


# -- the tutorial against the example package ----------------------------------------------------


@pytest.mark.parametrize("page", list(PAGES), ids=lambda p: p.stem)
def test_every_block_is_checked(page):
    blocks = page_blocks(page)
    assert len(blocks) > 10
    known = {"file", "part of", "run", "output", "doctest", "setup", "tree"}
    previous = None
    for block in blocks:
        assert block.kind in known, f"{block}: every code block needs one of the markers {sorted(known)}"
        if block.kind == "output":
            assert previous is not None and previous.kind == "run", f"{block}: an output block must follow a run block"
        previous = block


@pytest.mark.parametrize("example", ALL_EXAMPLES)
def test_file_blocks_are_the_example_package(example):
    shown = {}
    for block in tutorial_blocks(example):
        if block.kind == "file":
            path = block.folder / block.argument
            assert path.is_file(), f"{block}: the example package has no {block.argument}"
            diff = "".join(difflib.unified_diff(path.read_text().splitlines(True), block.body.splitlines(True), str(path), "tutorial"))
            assert block.body == path.read_text(), f"{block} differs from {path}:\n{diff}"
            shown[block.argument] = block
    assert set(shown) == example_files(example), "the tutorial must show every file of the example package, and only those"


def test_part_blocks_appear_in_their_files():
    for block in tutorial_blocks(None):
        if block.kind == "part of":
            assert block.body in (block.folder / block.argument).read_text(), f"{block} is not word for word in {block.argument}"


@pytest.mark.parametrize("example", ALL_EXAMPLES)
def test_tree_block_lists_the_package(example):
    (tree,) = [b for b in tutorial_blocks(example) if b.kind == "tree"]
    lines = tree.body.splitlines()
    assert lines[0] == f"{example}/"
    assert {l.strip() for l in lines[1:]} == example_files(example)


def test_setup_blocks_hold_only_known_commands():
    for block in tutorial_blocks(None):
        if block.kind == "setup":
            for line in block.body.strip().splitlines():
                assert line in SETUP, f"{block}: '{line}' is not a setup command the tests know; add it to SETUP"


def test_the_recipe_is_the_digits_recipe_with_the_selector_line_changed():
    def keys(path: Path) -> list[str]:
        return [l for l in path.read_text().splitlines() if l.strip() and not l.startswith("#")]

    diff = [l for l in difflib.ndiff(keys(ROOT / "recipes" / "digits.toml"), keys(EXAMPLE / "digits_geometric.toml")) if l[:1] in "+-"]
    assert diff == [
        '+ requires = ["contsup-geometric>=0.1"]', '+ use = "geometric"', '- use = "R1E"', '- encoder = "fast"', '- shortcut = "paper"'
    ]


def test_the_method_recipe_is_the_digits_recipe_with_the_table_added():
    def keys(path: Path) -> list[str]:
        return [l for l in path.read_text().splitlines() if l.strip() and not l.startswith("#")]

    diff = [l for l in difflib.ndiff(keys(ROOT / "recipes" / "digits.toml"), keys(EXAMPLES / MOMENTUM / "digits_momentum.toml")) if l[:1] in "+-"]
    assert diff == ['+ requires = ["contsup-momentum>=0.1"]', "+ [momentum_aux]", "+ momentum = 0.995"]


def test_the_method_takes_the_builtin_man_steps_to_the_bit(monkeypatch):
    """The tutorial writes contsup's MAN again: from one seed, [momentum_aux] and [man] (its
    copy starting as the live unit) build the same network and take the same steps."""
    monkeypatch.syspath_prepend(str(EXAMPLES / MOMENTUM))
    monkeypatch.delitem(sys.modules, "contsup_momentum", raising=False)
    import contsup_momentum
    import torch

    from contsup.testing import greedy_steps

    recipe = '[data]\nuse = "synthetic"\nshape = [3, 16, 16]\n[backbone]\nuse = "cifar_resnet20"\n[partition]\nmodules = 4\n'
    builtin = greedy_steps(recipe + '[man]\nmomentum = 0.9\nema_init = "copy"\n', contsup_momentum)
    plugin = greedy_steps(recipe + "[momentum_aux]\nmomentum = 0.9\n", contsup_momentum)
    for _ in range(3):
        assert builtin.step() == plugin.step()
    a, b = builtin.network.state_dict(), plugin.network.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[key], b[key]) for key in a), [key for key in a if not torch.equal(a[key], b[key])][:5]


@pytest.mark.parametrize("mutant", ["follow in place", "after_step one module late"])
def test_the_packages_moving_average_test_fails_what_the_page_says_it_fails(monkeypatch, mutant):
    """The page says its first test fails a `follow` written in place and an `after_step` that
    moves the previous module's copy (whose live unit has stepped by then); both are checked."""
    monkeypatch.syspath_prepend(str(EXAMPLES / MOMENTUM / "tests"))
    monkeypatch.syspath_prepend(str(EXAMPLES / MOMENTUM))
    for name in ("contsup_momentum", "test_contsup_momentum"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import contsup_momentum
    import test_contsup_momentum
    import torch

    text = METHOD_TUTORIAL.read_text()
    if mutant == "follow in place":
        assert "e.mul_(m).add_(p, alpha=1 - m)" in text

        @torch.no_grad()
        def follow(self, live, momentum):
            for e, p in zip(self.ema.parameters(), live.parameters()):
                e.mul_(momentum).add_(p, alpha=1 - momentum)

        monkeypatch.setattr(contsup_momentum.NextUnitCopies, "follow", follow)
    else:
        assert "moves module l-1's copy instead" in text

        def after_step(self, module, network):
            if module.index >= 2:
                previous = network.blocks[module.index - 2]
                previous.part.follow(contsup_momentum.next_unit(network, previous), self.options.momentum)

        monkeypatch.setattr(contsup_momentum.MomentumAux, "after_step", after_step)
    with pytest.raises(AssertionError):
        test_contsup_momentum.test_the_copy_follows_the_live_unit_to_the_bit()


@pytest.mark.parametrize("example", ALL_EXAMPLES)
def test_doctest_blocks(monkeypatch, example):
    module = example.replace("-", "_")
    monkeypatch.syspath_prepend(str(EXAMPLES / example))
    monkeypatch.setitem(sys.modules, module, None)  # restored (removed) afterwards
    del sys.modules[module]  # so the import below reads the example's file
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    blocks = [b for b in tutorial_blocks(example) if b.kind == "doctest"]
    assert blocks
    for block in blocks:
        test = parser.get_doctest(block.body, {}, str(block), str(block.page), block.line)
        result = runner.run(test)
        assert result.failed == 0, f"{block}: doctest failed (see the output above)"


def test_output_matching_is_strict_enough():
    out = "a  b\nc\nd\ne f g\n"
    assert matches_lines("a b\nc", out) == ""
    assert matches_lines("c\n...\ne ... g", out) == ""
    assert matches_lines("a b\nd", out) != ""  # not adjacent
    assert matches_lines("d\n...\nc", out) != ""  # out of order
    assert matches_lines("e f h", out) != ""


# -- the package installed for real ---------------------------------------------------------------


@pytest.fixture(scope="module")
def installed_examples(tmp_path_factory):
    """A copy of each example package, installed with pip into one target folder (as a reader
    following both parts has both in one environment), and the environment in which `contsup`
    and `python` see them."""
    tmp = tmp_path_factory.mktemp("tutorial")
    site = tmp / "site"
    folders = {}
    for example in ALL_EXAMPLES:
        folder = folders[example] = tmp / example
        shutil.copytree(EXAMPLES / example, folder, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache", "build", "*.egg-info", "runs"))
        pip = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
             "--target", str(site), str(folder)],
            capture_output=True, text=True, timeout=300,
        )
        assert pip.returncode == 0, pip.stdout + pip.stderr
        shutil.rmtree(folder / "build", ignore_errors=True)  # what the build leaves in the copy
        for egg in folder.glob("*.egg-info"):
            shutil.rmtree(egg)
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, command in {"contsup": "-m contsup", "python": ""}.items():
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" {command} "$@"\n')
        script.chmod(0o755)
    env = dict(os.environ)
    env.pop("CONTSUP_LOAD_PLUGINS", None)
    env.pop("PYTHONUNBUFFERED", None)  # what a user's shell has: the commands' output order must not depend on it
    path = [str(site), str(ROOT), str(ROOT / "plugins")]
    env["PYTHONPATH"] = os.pathsep.join(path + [p for p in [env.get("PYTHONPATH")] if p])
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # small networks: threads only contend with each other
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return folders, env


@pytest.fixture(scope="module")
def installed(installed_examples):
    """The first example's copy and the environment (both examples installed)."""
    folders, env = installed_examples
    return folders[GEOMETRIC], env


def run(command: str, folder: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-e", "-c", command], cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=600,
    )


def test_installed_package_is_listed_with_its_distribution(installed):
    folder, env = installed
    result = run("contsup plugins --json", folder, env)
    assert result.returncode == 0, result.stdout
    data = json.loads(result.stdout)
    (plugin,) = [p for p in data["plugins"] if p["name"] == "geometric"]
    assert plugin["distribution"] == "contsup-geometric" and plugin["version"] == "0.1.0"
    assert plugin["builtin"] is False and plugin["entry_point"] == "contsup_geometric"
    assert plugin["registered"] == [{"kind": "context selector", "name": "geometric"}]
    assert data["errors"] == []


def test_the_method_package_is_listed(installed_examples):
    folders, env = installed_examples
    result = run("contsup plugins --json", folders[MOMENTUM], env)
    assert result.returncode == 0, result.stdout
    data = json.loads(result.stdout)
    (plugin,) = [p for p in data["plugins"] if p["name"] == "momentum"]
    assert plugin["distribution"] == "contsup-momentum" and plugin["version"] == "0.1.0"
    assert plugin["registered"] == [{"kind": "method", "name": "momentum_aux"}]
    assert data["errors"] == []


def test_the_layout_aware_package_is_listed(installed_examples):
    folders, env = installed_examples
    result = run("contsup plugins --json", folders[STAGESKIP], env)
    assert result.returncode == 0, result.stdout
    data = json.loads(result.stdout)
    (plugin,) = [p for p in data["plugins"] if p["name"] == "stageskip"]
    assert plugin["distribution"] == "contsup-stageskip" and plugin["version"] == "0.1.0"
    assert plugin["registered"] == [{"kind": "context selector", "name": "stage_entry"}]
    assert data["errors"] == []


def run_page(page: Path, folders: dict[str, Path], env: dict) -> int:
    """Runs every `run` block of ``page`` in order, as the reader would, each in its example's
    folder, and checks the outputs shown; returns how many ran."""
    blocks = page_blocks(page)
    ran = 0
    for i, block in enumerate(blocks):
        if block.kind != "run":
            continue
        command = block.body.strip()
        expected_status = 0
        if block.marker.startswith("run, shortened by the tests:"):
            command += " " + block.argument.split(":", 1)[1].strip()
        elif block.argument:
            assert block.argument == "exit 2", f"{block}: unknown run marker"
            expected_status = 2
        result = run(command, folders[block.example], env)
        ran += 1
        assert result.returncode == expected_status, f"{block}: `{command}` exited {result.returncode}:\n{result.stdout}"
        assert "Traceback" not in result.stdout, f"{block}: `{command}` printed a traceback:\n{result.stdout}"
        following = blocks[i + 1] if i + 1 < len(blocks) else None
        if following is not None and following.kind == "output":
            missing = matches_lines(following.body, result.stdout)
            assert not missing, f"{following}: {missing}\nthe command printed:\n{result.stdout}"
    return ran


@pytest.mark.slow
def test_tutorial_commands_run_and_print_what_it_shows(installed_examples):
    """Runs every `run` block in order, as the reader would, each in its example's folder, and
    checks the outputs shown."""
    folders, env = installed_examples
    folder = folders[GEOMETRIC]
    ran = run_page(TUTORIAL, folders, env)
    assert ran >= 5
    # what the tutorial says of the run directory
    versions = json.loads((folder / "runs" / "digits_geometric" / "plugins.json").read_text())
    assert versions["plugins"]["geometric"] == {
        "distribution": "contsup-geometric", "version": "0.1.0", "builtin": False, "recipe": {"context": "geometric"}
    }
    assert versions["plugins"]["contsup_context"]["recipe"] == {}  # not named, yet its M_E encodes x
    smoke = json.loads((folders[STAGESKIP] / "runs" / "smoke_stageskip" / "plugins.json").read_text())
    assert smoke["plugins"]["stageskip"]["recipe"] == {"context": "stage_entry"}


@pytest.mark.slow
def test_method_tutorial_commands_run_and_print_what_it_shows(installed_examples):
    """The method tutorial's commands, as the reader runs them, and what its run directory holds."""
    folders, env = installed_examples
    assert run_page(METHOD_TUTORIAL, folders, env) >= 5
    versions = json.loads((folders[MOMENTUM] / "runs" / "digits_momentum" / "plugins.json").read_text())
    assert versions["plugins"]["momentum"] == {
        "distribution": "contsup-momentum", "version": "0.1.0", "builtin": False, "recipe": {"momentum_aux": "momentum_aux"}
    }

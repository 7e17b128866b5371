"""docs/plugins/tutorial-partitioner.md against its example package, docs/plugins/examples/
contsup-flops: every code block is checked (file blocks equal the package's files, parts appear
in them word for word, doctests pass, partition tables validate), and the page's commands run in
a copy of the package installed with pip (its own tests, ``contsup plan``), printing what the
page shows."""

from __future__ import annotations

import difflib
import doctest
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from contsup.tools.plan import plan_data
from contsup.testing import validate_recipe

from conftest import ROOT
from test_plugin_tutorial import matches_lines

TUTORIAL = ROOT / "docs" / "plugins" / "tutorial-partitioner.md"
EXAMPLE = ROOT / "docs" / "plugins" / "examples" / "contsup-flops"
BLOCK = re.compile(r"(?:<!-- (?P<marker>[^\n]*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)^```", re.S | re.M)
KINDS = {"file", "part of", "doctest", "partition table", "run", "output"}
# What the reader types to set up, and what the test does instead (see the `installed` fixture).
SETUP = {'pip install -e ".[test]"': "pip install --no-deps --no-build-isolation --target (the test's environment has pytest)"}
LEFT_BEHIND = ("__pycache__", ".pytest_cache", ".hypothesis", "build")  # what running the tests leaves
RECIPE = '[data]\nuse = "synthetic"\nshape = [3, 32, 32]\n\n[backbone]\nuse = "cifar_resnet32"\n\n'


def blocks() -> list[tuple[str, str, str, int]]:
    """(kind, argument, body, line) of every code block of the page."""
    text = TUTORIAL.read_text()
    out = []
    for m in BLOCK.finditer(text):
        marker = m["marker"] or ""
        kind, _, argument = marker.partition(":")
        out.append((kind.strip(), argument.strip(), m["body"], text.count("\n", 0, m.start("body"))))
    return out


def example_files() -> set[str]:
    return {
        p.relative_to(EXAMPLE).as_posix() for p in EXAMPLE.rglob("*")
        if p.is_file() and not any(part in LEFT_BEHIND or part.endswith(".egg-info") for part in p.relative_to(EXAMPLE).parts)
    }


@pytest.fixture
def example_on_path(monkeypatch):
    """The example package importable as the reader has it installed (a fresh import)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.delitem(sys.modules, "contsup_flops", raising=False)
    yield
    sys.modules.pop("contsup_flops", None)


def test_every_block_has_a_checked_kind():
    found = blocks()
    assert len(found) >= 8
    for kind, _, _, line in found:
        assert kind in KINDS, f"{TUTORIAL.name}, line {line}: every code block needs one of the markers {sorted(KINDS)}"


def test_file_blocks_are_the_example_package_and_show_all_of_it():
    shown = set()
    for kind, argument, body, line in blocks():
        if kind == "file":
            path = EXAMPLE / argument
            assert path.is_file(), f"line {line}: the example package has no {argument}"
            diff = "".join(difflib.unified_diff(path.read_text().splitlines(True), body.splitlines(True), str(path), "tutorial"))
            assert body == path.read_text(), f"line {line} differs from {path}:\n{diff}"
            shown.add(argument)
    assert shown == example_files(), "the tutorial must show every file of the example package, and only those"


def test_part_blocks_appear_in_their_files():
    for kind, argument, body, line in blocks():
        if kind == "part of":
            assert body in (EXAMPLE / argument).read_text(), f"line {line} is not word for word in {argument}"


def test_doctest_blocks(example_on_path):
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    found = [b for b in blocks() if b[0] == "doctest"]
    assert len(found) == 2
    session: dict = {}  # one python session: the second block uses the first one's imports
    for _, _, body, line in found:
        test = parser.get_doctest(body, session, f"{TUTORIAL.name}, line {line}", str(TUTORIAL), line)
        result = runner.run(test, clear_globs=False)
        session.update(test.globs)
        assert result.failed == 0, f"{TUTORIAL.name}, line {line}: doctest failed (see the output above)"


def test_partition_tables_validate_with_the_plugin(example_on_path):
    import contsup_flops

    tables = [b for b in blocks() if b[0] == "partition table"]
    assert len(tables) == 1
    for _, _, body, _ in tables:
        recipe = validate_recipe(RECIPE + body, contsup_flops)
        assert recipe.partitioner.use == "flops_balanced"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A copy of the example package, installed with pip into a folder of its own, and the
    environment in which `contsup` and `python` see it, as a reader's shell would."""
    tmp = tmp_path_factory.mktemp("flops")
    folder, site, bin_dir = tmp / "contsup-flops", tmp / "site", tmp / "bin"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns(*LEFT_BEHIND, "*.egg-info"))
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(site), str(folder)],
        capture_output=True, text=True, timeout=300,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    shutil.rmtree(folder / "build", ignore_errors=True)
    bin_dir.mkdir()
    for name, command in {"contsup": "-m contsup", "python": ""}.items():
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" {command} "$@"\n')
        script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CONTSUP_LOAD_PLUGINS", "PYTHONUNBUFFERED")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), str(ROOT / "plugins"), *filter(None, [env.get("PYTHONPATH")])])
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    env |= {"OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return folder, env


@pytest.mark.slow
def test_the_commands_run_and_print_what_the_page_shows(installed):
    """Every `run` block in order, in the package's folder: status 0, no traceback, and the
    `output` block after it matched line by line; the package's own tests pass."""
    folder, env = installed
    found = blocks()
    ran = []
    for (kind, _, body, line), following in zip(found, [*found[1:], None]):
        if kind != "run":
            continue
        commands = [c for c in body.strip().splitlines() if c.strip() not in SETUP]
        result = subprocess.run(
            ["bash", "-e", "-c", "\n".join(commands)], cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=600,
        )
        ran += commands
        assert result.returncode == 0, f"line {line}: {commands} exited {result.returncode}:\n{result.stdout}"
        assert "Traceback" not in result.stdout, f"line {line}: {commands} printed a traceback:\n{result.stdout}"
        assert following is not None and following[0] == "output", f"line {line}: a run block needs an output block after it"
        missing = matches_lines(following[2], result.stdout)
        assert not missing, f"line {following[3]}: {missing}\nthe commands printed:\n{result.stdout}"
    assert ran == ["python -m pytest -q", "contsup plan resnet32_flops.toml"]


def test_the_uniform_split_the_page_compares_with():
    """What the page says `use = "uniform"` gives for its recipe: units, MFLOPs, memory."""
    text = (EXAMPLE / "resnet32_flops.toml").read_text().replace('use = "flops_balanced"', 'use = "uniform"')
    modules = plan_data(validate_recipe(text))["modules"]
    assert [m["units"] for m in modules] == [5, 5, 6]
    assert [round(m["memory"]["body_flops"] / 1e6, 1) for m in modules] == [38.6, 45.1, 54.5]
    assert round(max(m["memory"]["bytes"] for m in modules) / 2**20, 1) == 153.6
    page = TUTORIAL.read_text()
    assert "5, 5 and 6 units, 38.6, 45.1 and 54.5 MFLOPs" in page and "keeps 153.6 MiB" in page


def test_the_hooks_page_and_the_index_link_the_tutorial():
    for page in ("hooks.md", "index.md"):
        assert "(tutorial-partitioner.md)" in (Path(TUTORIAL.parent) / page).read_text(), page

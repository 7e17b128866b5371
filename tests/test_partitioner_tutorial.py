"""docs/plugins/tutorial-partitioner.md against its example package, docs/plugins/examples/
contsup-flops: every code block is checked (file blocks equal the package's files, parts appear
in them word for word, doctests pass, partition tables validate), and the package's own tests,
which the page shows, pass."""

from __future__ import annotations

import difflib
import doctest
import importlib.util
import inspect
import re
import sys
from pathlib import Path

import pytest

from contsup.testing import validate_recipe

from conftest import ROOT

TUTORIAL = ROOT / "docs" / "plugins" / "tutorial-partitioner.md"
EXAMPLE = ROOT / "docs" / "plugins" / "examples" / "contsup-flops"
BLOCK = re.compile(r"(?:<!-- (?P<marker>[^\n]*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)^```", re.S | re.M)
KINDS = {"file", "part of", "doctest", "partition table"}
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
    assert len(tables) == 2
    for _, _, body, _ in tables:
        recipe = validate_recipe(RECIPE + body, contsup_flops)
        assert recipe.partitioner.use == "flops_balanced"


def test_the_example_package_tests_pass(example_on_path):
    """The page's test file, imported and run as pytest would (its tests take no fixtures)."""
    spec = importlib.util.spec_from_file_location("test_contsup_flops_example", EXAMPLE / "tests" / "test_contsup_flops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [(name, fn) for name, fn in vars(module).items() if name.startswith("test_") and callable(fn)]
    assert len(tests) == 5
    for name, fn in tests:
        assert not inspect.signature(fn).parameters or hasattr(fn, "hypothesis"), f"{name} takes fixtures"
        fn()


def test_the_hooks_page_and_the_index_link_the_tutorial():
    for page in ("hooks.md", "index.md"):
        assert "(tutorial-partitioner.md)" in (Path(TUTORIAL.parent) / page).read_text(), page

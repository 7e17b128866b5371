"""The docs cannot drift from the code: the recipe reference is generated, the README keeps its
two commands, and every recipe section is documented."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from contsup.tools.reference import builtin_reference
from contsup.config.schema import SECTIONS

from conftest import ROOT


def test_recipe_reference_is_up_to_date():
    text = (ROOT / "docs" / "recipes.md").read_text()
    assert text == builtin_reference(), "docs/recipes.md is stale: run python -m contsup.tools.reference > docs/recipes.md"


def test_every_section_and_option_is_documented():
    text = (ROOT / "docs" / "recipes.md").read_text()
    for section in SECTIONS:
        assert f"## `[{section.name}]`" in text
    for row in re.findall(r"^\| `[^`]+` \| .* \| (.*) \|$", text, flags=re.M):
        assert row.strip(), "an option has no documentation"


def test_readme_has_exactly_two_setup_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    assert len(blocks) == 2
    assert "contsup train recipes/digits.toml" in blocks[0] and "pip install -e ." in blocks[0]
    assert "pytest" in blocks[1] and '".[test]"' in blocks[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in readme and "test-command" in ci


# -- command-and-output blocks ---------------------------------------------------------------------
#
# A fenced block of a language a reader types or saves (bash, python, toml, markdown) is input; any
# other block (no language, text, json, ...) shows what a program prints or writes, and must be one of:
#   <!-- output -->        right after a `<!-- run -->` bash block: the test below runs the command
#                          and finds these lines in what it prints (`...` skips lines or text);
#   <!-- illustrative -->  an example of what it looks like (an error from a situation the docs
#                          describe, a file's layout), not run by a test.
# The plugin tutorial has markers and a test of its own (tests/test_plugin_tutorial.py).

INPUT_LANGS = {"bash", "python", "toml", "markdown"}
RUN = ("run", "run: exit 2")  # the README's <!-- run-command --> and <!-- test-command --> are CI's, not these
MARKERS = {*RUN, "output", "illustrative"}
DOC_BLOCK = re.compile(
    r"(?:^[ \t]*<!-- (?P<marker>[^\n]*?) -->\n)?^(?P<indent>[ \t]*)```(?P<lang>\w*)\n(?P<body>.*?)^(?P=indent)```", re.S | re.M
)


def doc_files() -> list:
    docs = sorted((ROOT / "docs").rglob("*.md"))
    # the plugin tutorials have markers and tests of their own (tests/test_plugin_tutorial.py, tests/test_partitioner_tutorial.py)
    skip = {ROOT / "docs" / "plugins" / name for name in ("tutorial-context-selector.md", "tutorial-partitioner.md", "tutorial-method.md")}
    return [ROOT / "README.md"] + [p for p in docs if p not in skip and "examples" not in p.relative_to(ROOT / "docs").parts]


def doc_blocks(path) -> list[dict]:
    text = path.read_text()
    return [
        {"marker": m["marker"] or "", "lang": m["lang"], "body": m["body"], "where": f"{path.relative_to(ROOT)}, line {text.count(chr(10), 0, m.start('lang')) + 1}"}
        for m in DOC_BLOCK.finditer(text)
    ]


def test_every_output_block_is_run_by_a_test_or_marked_illustrative():
    problems = []
    for path in doc_files():
        previous = None
        for block in doc_blocks(path):
            marker, where = block["marker"], block["where"]
            if marker and marker not in MARKERS and not marker.endswith("-command"):
                problems.append(f"{where}: unknown marker '{marker}' (known: {sorted(MARKERS)})")
            elif block["lang"] not in INPUT_LANGS and marker not in ("output", "illustrative"):
                problems.append(f"{where}: an output block ({block['lang'] or 'no language'}) needs <!-- output --> after a <!-- run --> block, or <!-- illustrative -->")
            elif marker == "output" and (previous is None or previous["marker"] not in RUN):
                problems.append(f"{where}: an output block must follow a <!-- run --> block")
            elif marker in RUN and block["lang"] != "bash":
                problems.append(f"{where}: a run block is a bash block")
            if block["lang"] == "bash" and marker != "illustrative":
                for line in block["body"].splitlines():
                    if re.search(r"#.*\d(\.\d+)? ?%", line):
                        problems.append(f"{where}: '{line.strip()}' quotes a result in a command block; quote it from its generated page")
            previous = block
    assert not problems, "\n".join(problems)


def test_the_checker_knows_an_unmarked_output_block(tmp_path, monkeypatch):
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    page.write_text("```bash\ncontsup plan x.toml\n```\n\n```\nmodule  units\n```\n")
    (tmp_path / "README.md").write_text("<!-- illustrative -->\n```\nshown\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="page.md, line 5: an output block"):
        test_every_output_block_is_run_by_a_test_or_marked_illustrative()
    page.write_text("<!-- run -->\n```bash\ncontsup plan x.toml\n```\n\n<!-- output -->\n```\nmodule  units\n```\n")
    test_every_output_block_is_run_by_a_test_or_marked_illustrative()
    page.write_text("```bash\ncontsup train x.toml   # test error 1.11 %\n```\n")
    with pytest.raises(AssertionError, match="quotes a result"):
        test_every_output_block_is_run_by_a_test_or_marked_illustrative()


@pytest.mark.slow
def test_run_blocks_print_what_the_docs_show(tmp_path):
    """Every `<!-- run -->` block of the docs, run from the repository root as a reader would (in a
    plain environment: stdout and stderr read apart, so buffering cannot reorder them), and the
    `<!-- output -->` block after it found in what it printed."""
    from test_plugin_tutorial import matches_lines

    bin_dir = tmp_path / "bin"  # `contsup` is this interpreter's, whatever PATH holds
    bin_dir.mkdir()
    (bin_dir / "contsup").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m contsup "$@"\n')
    (bin_dir / "contsup").chmod(0o755)
    env = {
        "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "/usr/bin:/bin")]), "HOME": str(tmp_path),
        "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")]),
    }
    ran = 0
    for path in doc_files():
        blocks = doc_blocks(path)
        for i, block in enumerate(blocks):
            if block["marker"] not in RUN:
                continue
            status = 2 if block["marker"] == "run: exit 2" else 0
            command = block["body"].strip()
            result = subprocess.run(["bash", "-e", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            ran += 1
            printed = result.stdout + result.stderr
            assert result.returncode == status, f"{block['where']}: `{command}` exited {result.returncode}:\n{printed}"
            assert "Traceback" not in printed, f"{block['where']}: a traceback:\n{printed}"
            following = blocks[i + 1] if i + 1 < len(blocks) else None
            if following is not None and following["marker"] == "output":
                missing = matches_lines(following["body"], printed)
                assert not missing, f"{following['where']}: {missing}\nthe command printed:\n{printed}"
    assert ran >= 1


# -- the flagship's figures: one generated place ------------------------------------------------------


def flagship_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("flagship", ROOT / "benchmarks" / "flagship.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_flagship_page_is_what_its_measurements_give():
    import json

    flagship = flagship_script()
    results = json.loads((ROOT / "benchmarks" / "flagship.json").read_text())
    assert (ROOT / "docs" / "flagship.md").read_text() == flagship.render(results), (
        "docs/flagship.md is stale: run python benchmarks/flagship.py --sections ''"
    )


def test_the_readme_time_claim_is_the_measured_one():
    import json

    flagship = flagship_script()
    claim = flagship.readme_time(json.loads((ROOT / "benchmarks" / "flagship.json").read_text()))
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert claim in readme, f"the README's time for recipes/digits.toml should say: {claim} (benchmarks/flagship.json)"

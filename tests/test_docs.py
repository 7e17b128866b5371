"""The docs cannot drift from the code: the recipe reference is generated, the README keeps its
two commands, and every recipe section is documented."""

from __future__ import annotations

import re

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

"""The code stays in rooms a reader can live in: no module of contsup/ over 500 lines, no function
over 80 (an argparse parser aside), and no reaching into another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
# functions that only declare a command line: one add_argument after another, nothing to split
PARSER_BUILDERS = {("contsup/cli.py", "build_parser")}


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_no_module_is_over_500_lines():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in sources("contsup") if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, f"split these by concern (at most {MAX_MODULE_LINES} lines): {long}"


def long_functions(path: Path, root: Path = ROOT, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    rel = path.relative_to(root).as_posix()
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (rel, node.name) not in PARSER_BUILDERS:
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                out.append(f"{rel}:{node.lineno} {node.name}: {length} lines")
    return out


def test_no_function_is_over_80_lines():
    found = [line for p in sources("contsup", "plugins") for line in long_functions(p)]
    assert not found, f"split these into functions of at most {MAX_FUNCTION_LINES} lines: {found}"


def private_definitions(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, and attributes it assigns (``self._x = ...``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def private_reaches(files: list[Path], root: Path = ROOT) -> list[str]:
    """``something._name`` where ``_name`` is private to another of ``files`` and not to this one
    (``self._x`` and ``cls._x`` are a class's own)."""
    trees = {p: ast.parse(p.read_text()) for p in files}
    owners: dict[str, set[Path]] = {}
    for p, tree in trees.items():
        for name in private_definitions(tree):
            owners.setdefault(name, set()).add(p)
    found = []
    for p, tree in trees.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or node.attr not in owners or p in owners[node.attr]:
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            where = ", ".join(sorted(str(o.relative_to(root)) for o in owners[node.attr]))
            found.append(f"{p.relative_to(root)}:{node.lineno} .{node.attr} (private to {where})")
        for node in ast.walk(tree):  # from contsup.module import _name
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0].startswith("contsup"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{p.relative_to(root)}:{node.lineno} imports {node.module}.{alias.name}")
    return found


def test_no_module_reaches_into_another_modules_private_names():
    found = private_reaches(sources("contsup", "plugins"))
    assert not found, f"make these public, or ask the owning module for what is needed: {found}"


def test_the_private_name_check_sees_a_reach(tmp_path):
    (tmp_path / "a.py").write_text("class A:\n    def _secret(self):\n        return 1\n")
    (tmp_path / "b.py").write_text("from a import A\n\ndef use(a: A):\n    return a._secret()\n")
    (tmp_path / "c.py").write_text("class C:\n    def run(self):\n        return self._own()\n    def _own(self):\n        return 2\n")
    files = [tmp_path / name for name in ("a.py", "b.py", "c.py")]
    assert private_reaches(files, tmp_path) == ["b.py:4 ._secret (private to a.py)"]


def test_the_size_checks_see_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(90))
    path = tmp_path / "long.py"
    path.write_text(f"def long():\n{body}\n")
    assert long_functions(path, tmp_path) == ["long.py:1 long: 91 lines"]

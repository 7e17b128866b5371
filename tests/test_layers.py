"""Layers import downward only, and the import graph has no cycle.

An AST walk of every import in contsup/ and plugins/contsup_* (top-level and inside functions,
relative ones too) against the one layer table, contsup/core/import_layers.py. It fails when

(a) a module imports a higher layer (or a module the table does not place),
(b) a built-in plugin imports anything of contsup but the plugin API (or another plugin),
    or a contsup module imports a built-in plugin,
(c) a function imports a project module outside the places allowed to (cli, the facade, a
    plugin importing its own package),
(d) the import graph has a cycle.

Each problem names the importing file:line, the imported module and both layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import attrs

from conftest import ROOT

from contsup.core import import_layers as table

# The edges allowed to break a rule for now, each with why; one that disappears must be removed.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}  # (importer, imported): why it may break the rules for now


@attrs.frozen
class Import:
    path: str  # relative to the root, posix
    line: int
    importer: str
    target: str
    in_function: bool

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def find_modules(root: Path) -> dict[str, Path]:
    """``{dotted name: file}`` for contsup/ and each plugins/contsup_* package."""
    out: dict[str, Path] = {}
    bases = [(root, root / "contsup")] + [(root / "plugins", p) for p in sorted((root / "plugins").glob("contsup_*"))]
    for base, package in bases:
        if not package.is_dir():
            continue
        for path in sorted(package.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_project(name: str, plugins: set[str]) -> bool:
    top = name.split(".")[0]
    return top == "contsup" or top in plugins


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The module an import of dotted ``name`` loads: its longest prefix that is a module (a name
    inside a module is not one); a contsup module not written yet (contsup.api) keeps its name."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in modules and (prefix != "contsup" or n == len(parts)):
            return prefix
    return name


def _facade_names(root: Path, modules: dict[str, Path], plugins: set[str]) -> dict[str, str]:
    """For the facade's top-level imports, ``{name it binds: module it comes from}``: ``from
    contsup import hookimpl`` loads contsup.hookspecs (and the facade's top level), no more."""
    path = root / "contsup" / "__init__.py"
    if not path.exists():
        return {}
    out = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_project(node.module, plugins):
            for alias in node.names:
                out[alias.asname or alias.name] = _resolve(f"{node.module}.{alias.name}", modules)
    return out


def collect(root: Path) -> tuple[dict[str, Path], list[Import]]:
    """Every import of a project module in the tree at ``root``."""
    modules = find_modules(root)
    plugins = {m for m in modules if m.startswith("contsup_") and "." not in m}
    facade = _facade_names(root, modules, plugins)
    found: list[Import] = []
    for module, path in modules.items():
        rel = path.relative_to(root).as_posix()
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]

        def add(node: ast.AST, target: str, in_function: bool) -> None:
            if _is_project(target, plugins) and target != module:
                found.append(Import(rel, node.lineno, module, target, in_function))

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.Import):
                    for alias in child.names:
                        add(child, _resolve(alias.name, modules), in_function)
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        up = package.split(".")[: len(package.split(".")) - child.level + 1]
                        base = ".".join(up + ([base] if base else []))
                    for alias in child.names:
                        full = f"{base}.{alias.name}"
                        if full in modules:
                            target = full
                        elif base == "contsup":
                            target = facade.get(alias.name, "contsup")
                        else:
                            target = _resolve(base, modules)
                        add(child, target, in_function)
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(ast.parse(path.read_text(encoding="utf-8"), rel), False)
    return modules, found


def layer_of(module: str) -> str | None:
    """The layer holding ``module`` (the longest matching group), a built-in plugin's, or None."""
    if module.split(".")[0].startswith("contsup_"):
        return table.PLUGIN_LAYER
    best, best_len = None, -1
    for layer, groups in table.LAYERS:
        for group in groups:
            matches = module == group or (group != "contsup" and module.startswith(group + "."))
            if matches and len(group) > best_len:
                best, best_len = layer, len(group)
    return best


RANK = {layer: len(table.LAYERS) - i for i, (layer, _) in enumerate(table.LAYERS)}  # higher imports lower


def _rule_problems(imports: list[Import], exceptions: dict) -> list[str]:
    problems = []
    for imp in imports:
        if (imp.importer, imp.target) in exceptions:
            continue
        own, their = layer_of(imp.importer), layer_of(imp.target)
        said = f"{imp.where()}: {imp.importer} ({own}) imports {imp.target} ({their})"
        plugin_package = imp.importer.split(".")[0]
        if own == table.PLUGIN_LAYER:
            if imp.target.split(".")[0] == plugin_package:
                continue  # its own package, lazily too
            if their not in table.PLUGIN_MAY_IMPORT:
                problems.append(f"{said}: a built-in plugin may import only the plugin API and its own package")
            elif imp.in_function:
                problems.append(f"{said} inside a function: import it at the top of the file")
            continue
        if own is None:
            problems.append(f"{said}: {imp.importer} is in no layer of contsup/core/import_layers.py; place it there")
            continue
        if their == table.PLUGIN_LAYER:
            problems.append(f"{said}: the core imports no built-in plugin (they load by name, contsup.core.plugins)")
        elif their is None:
            problems.append(f"{said}: {imp.target} is in no layer of contsup/core/import_layers.py")
        elif RANK[their] > RANK[own]:
            problems.append(f"{said}: a higher layer; layers import downward only")
        elif own == "facade" and not imp.in_function and their not in table.FACADE_TOP_LEVEL:
            problems.append(
                f"{said} at the top of the facade, which every import of contsup runs: "
                f"import it lazily (only {', '.join(table.FACADE_TOP_LEVEL)} at the top)"
            )
        if imp.in_function and imp.importer not in table.LAZY_IMPORTS_ALLOWED:
            problems.append(
                f"{said} inside a function: import project modules at the top of the file "
                f"(only {', '.join(table.LAZY_IMPORTS_ALLOWED)} import them lazily)"
            )
    return problems


def _cycles(imports: list[Import], exceptions: dict) -> list[list[Import]]:
    """One cycle of imports through each strongly connected component of more than one module."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if (imp.importer, imp.target) not in exceptions:
            edges.setdefault(imp.importer, {}).setdefault(imp.target, imp)
            edges.setdefault(imp.target, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    cycles = []
    for component in components:
        start = min(component)
        seen: dict[str, tuple[str, Import] | None] = {start: None}  # breadth first: a shortest way back
        queue, back = [start], None
        while queue and back is None:
            v = queue.pop(0)
            for w, imp in sorted(edges[v].items()):
                if w == start:
                    back = (v, imp)
                    break
                if w in component and w not in seen:
                    seen[w] = (v, imp)
                    queue.append(w)
        chain = [back[1]]
        v = back[0]
        while seen[v] is not None:
            v, imp = seen[v]
            chain.append(imp)
        cycles.append(chain[::-1])
    return cycles


def check(root: Path, exceptions: dict | None = None) -> list[str]:
    """Every problem of the tree at ``root``, one line each; [] when it keeps the rules."""
    exceptions = KNOWN_EXCEPTIONS if exceptions is None else exceptions
    _, imports = collect(root)
    problems = _rule_problems(imports, exceptions)
    for chain in _cycles(imports, exceptions):
        steps = "; ".join(
            f"{imp.where()} {imp.importer} ({layer_of(imp.importer)}) -> {imp.target} ({layer_of(imp.target)})" for imp in chain
        )
        problems.append(f"import cycle of {len(chain)} modules: {steps}")
    seen = {(imp.importer, imp.target) for imp in imports}
    problems += [
        f"KNOWN_EXCEPTIONS lists {a} -> {b}, which no longer exists: remove it" for a, b in exceptions if (a, b) not in seen
    ]
    return problems


# -- the project ---------------------------------------------------------------------------------


def test_the_project_keeps_its_layers():
    problems = check(ROOT)
    assert not problems, "\n".join(problems)


def test_every_module_is_in_a_layer():
    modules = find_modules(ROOT)
    assert "contsup.cli" in modules and "contsup.core.plugins" in modules and "contsup_context.adapters" in modules
    assert [m for m in modules if layer_of(m) is None] == []


def test_the_checker_sees_the_imports_it_must():
    _, imports = collect(ROOT)
    edges = {(i.importer, i.target) for i in imports}
    assert ("contsup_context", "contsup.hookspecs") in edges  # from contsup import hookimpl
    assert ("contsup_context", "contsup_context.adapters") in edges
    assert ("contsup.model.network", "contsup.model.fitting") in edges
    assert ("contsup", "contsup.api") in edges  # the facade's lazy re-exports of the API
    assert any(i.in_function for i in imports if i.importer == "contsup.cli")


def test_the_layer_table_is_the_documented_order():
    assert [layer for layer, _ in table.LAYERS] == [
        "facade", "cli", "tools", "api", "distributed", "training", "model", "config", "core", "plugin API",
    ]
    assert layer_of("contsup.api") == "api" and layer_of("contsup.testing") == "tools"
    assert layer_of("contsup.adapters") == "plugin API" and layer_of("contsup.core.import_layers") == "core"


# -- the checker can fail ------------------------------------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in {"contsup/__init__.py": "from contsup.errors import ContsupError\n", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (root / "plugins").mkdir(exist_ok=True)
    return root


def test_a_clean_tree_passes(tmp_path):
    root = _tree(tmp_path, {
        "contsup/errors.py": "class ContsupError(Exception):\n    pass\n",
        "contsup/cli.py": "from contsup.errors import ContsupError\n\ndef main():\n    from contsup.core import plugins\n",
        "contsup/core/__init__.py": "",
        "contsup/core/plugins.py": "from contsup import ContsupError\n",
        "plugins/contsup_x/__init__.py": "from contsup import ContsupError\n\ndef f():\n    from . import sub\n",
        "plugins/contsup_x/sub.py": "from contsup.errors import ContsupError\n",
    })
    assert check(root, exceptions={}) == []


def test_it_reports_an_upward_import_inside_a_function_and_the_cycle(tmp_path):
    root = _tree(tmp_path, {
        "contsup/errors.py": "class ContsupError(Exception):\n    def say(self):\n        from contsup.cli import main\n",
        "contsup/cli.py": "from contsup.errors import ContsupError\n",
    })
    problems = check(root, exceptions={})
    assert "contsup/errors.py:3: contsup.errors (plugin API) imports contsup.cli (cli): a higher layer; layers import downward only" in problems
    assert any(p.startswith("contsup/errors.py:3: contsup.errors (plugin API) imports contsup.cli (cli) inside a function") for p in problems)
    cycle = [p for p in problems if p.startswith("import cycle")]
    assert cycle == [
        "import cycle of 2 modules: contsup/cli.py:1 contsup.cli (cli) -> contsup.errors (plugin API); "
        "contsup/errors.py:3 contsup.errors (plugin API) -> contsup.cli (cli)"
    ]


def test_it_reports_a_cycle_inside_one_layer_and_relative_imports(tmp_path):
    root = _tree(tmp_path, {
        "contsup/errors.py": "",
        "contsup/model/__init__.py": "",
        "contsup/model/a.py": "from .b import thing\n",
        "contsup/model/b.py": "from contsup.model import c\n",
        "contsup/model/c.py": "from . import a\n",
    })
    problems = check(root, exceptions={})
    assert len(problems) == 1 and problems[0].startswith("import cycle of 3 modules: contsup/model/a.py:1 contsup.model.a (model) -> contsup.model.b (model)")


def test_it_reports_plugins_reaching_past_the_plugin_api_and_the_core_naming_a_plugin(tmp_path):
    root = _tree(tmp_path, {
        "contsup/errors.py": "",
        "contsup/core/__init__.py": "",
        "contsup/core/registry.py": "",
        "contsup/model/__init__.py": "",
        "contsup/model/network.py": "def adapter():\n    import contsup_x.adapters\n",
        "plugins/contsup_x/__init__.py": "from contsup.core.registry import Registry\nimport contsup_y\n",
        "plugins/contsup_x/adapters.py": "def f():\n    from contsup.errors import ContsupError\n",
        "plugins/contsup_y/__init__.py": "",
    })
    problems = check(root, exceptions={})
    assert sorted(problems) == sorted([
        "contsup/model/network.py:2: contsup.model.network (model) imports contsup_x.adapters (built-in plugin): "
        "the core imports no built-in plugin (they load by name, contsup.core.plugins)",
        "contsup/model/network.py:2: contsup.model.network (model) imports contsup_x.adapters (built-in plugin) inside a function: "
        "import project modules at the top of the file (only contsup.cli, contsup import them lazily)",
        "plugins/contsup_x/__init__.py:1: contsup_x (built-in plugin) imports contsup.core.registry (core): "
        "a built-in plugin may import only the plugin API and its own package",
        "plugins/contsup_x/__init__.py:2: contsup_x (built-in plugin) imports contsup_y (built-in plugin): "
        "a built-in plugin may import only the plugin API and its own package",
        "plugins/contsup_x/adapters.py:2: contsup_x.adapters (built-in plugin) imports contsup.errors (plugin API) inside a function: "
        "import it at the top of the file",
    ])


def test_it_reports_the_facade_loading_layers_eagerly_and_unplaced_modules(tmp_path):
    root = _tree(tmp_path, {
        "contsup/__init__.py": "from contsup.training.rundir import load_model\n",
        "contsup/errors.py": "from contsup import load_model\n",
        "contsup/training/__init__.py": "",
        "contsup/training/rundir.py": "",
        "contsup/extras.py": "from contsup.errors import x\n",
    })
    problems = check(root, exceptions={})
    assert "contsup/errors.py:1: contsup.errors (plugin API) imports contsup.training.rundir (training): a higher layer; layers import downward only" in problems
    assert any(p.startswith("contsup/__init__.py:1: contsup (facade) imports contsup.training.rundir (training) at the top of the facade") for p in problems)
    assert "contsup/extras.py:1: contsup.extras (None) imports contsup.errors (plugin API): contsup.extras is in no layer of contsup/core/import_layers.py; place it there" in problems


def test_a_known_exception_silences_its_edge_until_it_is_gone(tmp_path):
    files = {
        "contsup/errors.py": "",
        "contsup/cli.py": "from contsup.tools import sweep\n",
        "contsup/tools/__init__.py": "",
        "contsup/tools/sweep.py": "def run():\n    from contsup.cli import main\n",
    }
    allowed = {("contsup.tools.sweep", "contsup.cli"): "why"}
    assert check(_tree(tmp_path / "a", files), exceptions=allowed) == []
    assert check(_tree(tmp_path / "b", {**files, "contsup/tools/sweep.py": ""}), exceptions=allowed) == [
        "KNOWN_EXCEPTIONS lists contsup.tools.sweep -> contsup.cli, which no longer exists: remove it"
    ]

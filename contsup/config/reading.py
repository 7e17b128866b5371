"""Reading recipes: TOML text and files (one-line errors naming file, line and column),
``extends`` chains, and ``--set key.path=value`` overrides."""

from __future__ import annotations

import copy
import errno
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from contsup.config.schema import SECTION, TOP_LEVEL_KEYS
from contsup.errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


# -- reading ----------------------------------------------------------------------------------

# Tables and arrays inside one another: a recipe needs four levels ([[modules]] entries' tables);
# hundreds would exhaust Python's recursion in the reader, the merge or the checks.
MAX_NESTING = 32
MAX_EXTENDS = 64  # recipes in one extends chain
# What TOML allows nowhere: control characters other than tab, line feed and carriage return.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _position(text: str, index: int) -> str:
    line = text.count("\n", 0, index) + 1
    return f"line {line}, column {index - text.rfind(chr(10), 0, index)}"


def nesting(value: Any) -> tuple[int, list[str]]:
    """How deep tables and arrays nest in ``value`` (a scalar: 0) and the key path to the deepest,
    measured without recursion and stopping past :data:`MAX_NESTING`."""
    deepest: tuple[int, list[str]] = (0, [])
    stack: list[tuple[Any, list[str]]] = [(value, [])]
    while stack and deepest[0] <= MAX_NESTING:
        node, path = stack.pop()
        if isinstance(node, Mapping):
            children = [(str(k), v) for k, v in node.items()]
        elif isinstance(node, list):
            children = [(str(i), v) for i, v in enumerate(node)]
        else:
            continue
        if len(path) + 1 > deepest[0]:
            deepest = (len(path) + 1, path)
        stack += [(v, [*path, k]) for k, v in children]
    return deepest


def _short_path(path: Sequence[str]) -> str:
    return ".".join(path) if len(path) <= 6 else f"{'.'.join(path[:3])} ... {'.'.join(path[-2:])}"


TOO_MANY_DIGITS = (
    f"an integer of more than {sys.get_int_max_str_digits()} digits; "
    f"no option takes one near that large (integers are 64-bit)"
)


def parse_toml(text: str, where: str) -> dict[str, Any]:
    """TOML text -> dict, or a one-line error naming the file, line and column. A byte-order
    mark at the start is ignored, as most TOML readers do; a control character is named."""
    text = text.removeprefix("\ufeff")
    bad = _CONTROL.search(text)
    if bad:
        kind = "a NUL byte" if bad.group() == "\0" else "a control character"
        raise RecipeError([
            f"{where}: not valid TOML: {kind} ({ascii(bad.group())[1:-1]}) at {_position(text, bad.start())}; "
            f"a recipe is plain text: remove it"
        ])
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc).replace(  # tomllib names the character by its escape, \n
            "Illegal character '\\n'", "a line break inside a one-line string (is a closing quote missing?)"
        )
        raise RecipeError([f"{where}: not valid TOML: {message}"]) from None
    except ValueError:  # Python refuses to convert an integer literal of thousands of digits
        raise RecipeError([f"{where}: {TOO_MANY_DIGITS}"]) from None
    except RecursionError:
        data = None
    depth, path = nesting(data) if data is not None else (MAX_NESTING + 1, [])
    if depth > MAX_NESTING:
        at = f" ({_short_path(path)})" if path else ""
        raise RecipeError([
            f"{where}: tables or arrays nested more than {MAX_NESTING} levels deep{at}; a recipe needs a few levels"
        ])
    return data


def read_toml(path: Path) -> dict[str, Any]:
    """Read and parse one TOML file, with one-line errors for missing or unreadable files."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError([f"{path}: no such recipe file"]) from None
    except IsADirectoryError:
        raise RecipeError([f"{path}: is a directory, not a recipe file"]) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RecipeError([_LINK_LOOP.format(path=path)]) from None
        raise RecipeError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError([f"{path}: not a text file (invalid UTF-8 at byte {exc.start})"]) from None
    return parse_toml(text, str(path))


def _merge(base: dict[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``; a table whose ``use`` changes replaces the base table."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            if "use" in value and value["use"] != out[key].get("use"):
                out[key] = copy.deepcopy(dict(value))
            else:
                out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


_LINK_LOOP = "{path}: a symbolic link loop (the link leads back to itself); point it at a recipe file"


def load_with_extends(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe at ``path`` merged over the recipes it ``extends`` (relative to its folder)."""
    path = Path(path)
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # a symbolic link loop (RuntimeError before Python 3.13)
        raise RecipeError([_LINK_LOOP.format(path=path)]) from None
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise RecipeError([f"{path}: extends: recipes extend each other in a cycle: {chain}"])
    if len(_seen) >= MAX_EXTENDS:
        raise RecipeError([
            f"{_seen[0]}: extends: a chain of more than {MAX_EXTENDS} recipes ({_seen[0].name} -> ... -> {path}); "
            f"at most {MAX_EXTENDS} recipes can extend one another"
        ])
    data = read_toml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    parents = [parent] if isinstance(parent, str) else parent
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise RecipeError([f"{path}: extends: expected a file name or a list of file names"])
    merged: dict[str, Any] = {}
    for name in parents:
        parent_path = path.parent / name
        if not name.strip():
            raise RecipeError([f'{path}: extends: "{name}" names no file; give a recipe file (relative to {path.parent})'])
        if parent_path.is_dir():
            raise RecipeError([f"{path}: extends: {parent_path} is a directory, not a recipe file"])
        if not (parent_path.exists() or parent_path.is_symlink()):
            raise RecipeError([f"{path}: extends: no such recipe file {parent_path}"])
        try:
            parent_path.resolve()
        except (OSError, RuntimeError):
            raise RecipeError([f"{path}: extends: " + _LINK_LOOP.format(path=parent_path)]) from None
        merged = _merge(merged, load_with_extends(parent_path, (*_seen, resolved)))
    return _merge(merged, data)


def is_sweep(data: Mapping[str, Any]) -> bool:
    """Whether parsed TOML is a sweep file: it has a ``[sweep]`` table (no recipe section has that name)."""
    return "sweep" in data


def is_recipe(data: Mapping[str, Any]) -> bool:
    """Whether parsed TOML looks like a recipe: it has one of the recipe's sections or top-level keys."""
    return any(key in SECTION or key in TOP_LEVEL_KEYS for key in data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], parsed value); a value that is not a TOML literal is a string."""
    if "=" not in text:
        raise ValueError(f"--set {text}: expected key.path=value")
    key, _, raw = text.partition("=")
    path = [p.strip() for p in key.strip().split(".")]
    if not all(path):
        raise ValueError(f"--set {text}: '{key}' is not a key path like optimizer.lr")
    if path[0] == "extends":
        raise ValueError(
            f"--set {text}: extends cannot be set on the command line (the recipes it names are merged before "
            f"--set applies); write extends in the recipe, or --set the keys themselves"
        )
    raw = raw.strip()
    shown = text if len(text) <= 80 else f"{text[:60]}...({len(text)} characters)"
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    except ValueError:  # an integer of thousands of digits
        raise ValueError(f"--set {shown}: {TOO_MANY_DIGITS}") from None
    except RecursionError:
        value = None
    if value is None or len(path) + nesting(value)[0] > MAX_NESTING:
        raise ValueError(f"--set {shown}: nests tables or arrays more than {MAX_NESTING} levels deep; a recipe needs a few levels")
    return path, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> tuple[dict[str, Any], list[str], list[str]]:
    """``data`` with every ``--set`` applied, the key paths they set and the problems found in them."""
    out = copy.deepcopy(data)
    keys, problems = [], []
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        problem = set_path(out, path, value, text)
        if problem:
            problems.append(problem)
        else:
            keys.append(".".join(path))
    return out, keys, problems


def set_path(data: dict[str, Any], path: Sequence[str], value: Any, text: str = "") -> str | None:
    """Set ``data[path...] = value`` in place (numeric parts index lists); a problem or None."""
    text = text or f"{'.'.join(path)}={value!r}"
    node: Any = data
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return f"--set {text}: {'.'.join(path[:i])} has no entry {part} (it has {len(node)})"
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            return f"--set {text}: {'.'.join(path[:i])} is not a table"
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})
    return None

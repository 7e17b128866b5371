"""A small TOML writer for resolved recipes (tables of scalars, lists and inline tables)."""

from __future__ import annotations

import json
import math
from typing import Any, Mapping


def value_literal(value: Any) -> str:
    """``value`` (a scalar, list or table) as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".eE") else text + ".0"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=True)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_literal(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {value_literal(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _key(key: str) -> str:
    bare = key and all(c.isalnum() or c in "-_" for c in key)
    return key if bare else json.dumps(key)


def dumps(data: Mapping[str, Any], header: str = "") -> str:
    """TOML text for ``data``: top-level scalars first, then one ``[table]`` per sub-table;
    arrays of tables are written as ``[[name]]`` blocks."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    scalars = {k: v for k, v in data.items() if not isinstance(v, Mapping) and not _is_table_array(v)}
    for k, v in scalars.items():
        lines.append(f"{_key(k)} = {value_literal(v)}")
    for k, v in data.items():
        if isinstance(v, Mapping):
            lines.append("")
            lines.append(f"[{_key(k)}]")
            lines.extend(f"{_key(sk)} = {value_literal(sv)}" for sk, sv in v.items())
        elif _is_table_array(v):
            for item in v:
                lines.append("")
                lines.append(f"[[{_key(k)}]]")
                lines.extend(f"{_key(sk)} = {value_literal(sv)}" for sk, sv in item.items())
    return "\n".join(lines).lstrip("\n") + "\n"


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)

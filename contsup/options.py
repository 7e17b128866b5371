"""Documented, typed options and their conversion from TOML values.

Component ``Options`` classes are frozen attrs classes whose fields are made with
:func:`option`; :func:`structure` turns one TOML table into an instance and returns every
problem it finds instead of stopping at the first.
"""

from __future__ import annotations

import importlib
import math
import types
import typing
from typing import Any, Callable, Iterable, Literal, Mapping, Union

import attrs

from contsup.suggest import did_you_mean

NOTHING = attrs.NOTHING

# What every number option can hold, whatever its own bounds: TOML's integers are 64-bit (and so
# are torch's), and training computes in float32 at most, so a float option beyond float32's
# range (a learning rate of 1e308) cannot be used. Options narrow these with their validators.
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
FLOAT_MAX = 3.4028234663852886e38  # the largest finite float32
MAX_EPOCHS = 1_000_000  # epochs (and warm-up epochs) a run can be given: far beyond any that can finish


def option(default: Any = NOTHING, *, doc: str, validator: Callable | None = None) -> Any:
    """An attrs field with a one-line ``doc`` (shown in docs/recipes.md) and a validator."""
    return attrs.field(default=default, validator=validator, kw_only=True, metadata={"doc": doc})


# -- validators: raise ValueError with a message that reads after the key path ----------------


def at_least(low: float) -> Callable:
    def check(_instance: Any, _attribute: Any, value: Any) -> None:
        if value < low:
            raise ValueError(f"must be >= {low}, got {value!r}")

    check.describe = f">= {low}"  # type: ignore[attr-defined]
    return check


def greater_than(low: float) -> Callable:
    def check(_instance: Any, _attribute: Any, value: Any) -> None:
        if not value > low:
            raise ValueError(f"must be > {low}, got {value!r}")

    check.describe = f"> {low}"  # type: ignore[attr-defined]
    return check


def in_range(low: float, high: float, *, high_open: bool = False) -> Callable:
    def check(_instance: Any, _attribute: Any, value: Any) -> None:
        ok = low <= value < high if high_open else low <= value <= high
        if not ok:
            bracket = ")" if high_open else "]"
            raise ValueError(f"must be in [{low}, {high}{bracket}, got {value!r}")

    check.describe = f"in [{low}, {high}{')' if high_open else ']'}"  # type: ignore[attr-defined]
    return check


def between(low: float, high: float) -> Callable:
    """``low <= value <= high``: a lower bound with a ceiling. The message names the end it
    crossed (``must be >= 1``, as :func:`at_least` says it, or ``must be <= 1000000``), then the range."""

    def check(_instance: Any, _attribute: Any, value: Any) -> None:
        if not low <= value <= high:
            end = f">= {low}" if value < low else f"<= {high}"
            raise ValueError(f"must be {end}, got {value!r} (allowed: {low} to {high})")

    check.describe = f"in [{low}, {high}]"  # type: ignore[attr-defined]
    return check


def allowed(f: attrs.Attribute, tp: Any) -> str:
    """The values an option of type ``tp`` allows, as docs/recipes.md writes them: what its
    validator declares, "any" for a number without one (every number option also stays within
    :data:`INT_MIN`..:data:`INT_MAX`, or float32's range), "" when nothing is declared."""
    described = getattr(f.validator, "describe", "")
    return described or ("any" if tp in (int, float) else "")


def requires_module(module: str, install: str) -> Callable:
    """A boolean option that, when true, needs ``module`` to be importable (an optional dependency)."""

    def check(_instance: Any, _attribute: Any, value: Any) -> None:
        if not value:
            return
        try:
            importlib.import_module(module)
        except ImportError:
            raise ValueError(f"true needs the '{module}' package, which is not installed; {install}, or set it to false") from None
        except Exception as exc:  # installed but broken: still one line, not a traceback
            raise ValueError(f"true needs the '{module}' package, which fails to import ({type(exc).__name__}: {exc})") from None

    return check


# -- type conversion ---------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is bool:
        return "a boolean (true/false)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(_toml_repr(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        inner = _type_name(args[0]) if args else "values"
        return f"a list of {inner.removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict:
        return "a table"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", str(tp))


def type_name(tp: Any) -> str:
    """How a type is written in docs and error messages."""
    return _type_name(tp)


def _toml_repr(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _value_desc(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    kind = next((k for t, k in kinds.items() if type(value) is t), type(value).__name__)
    shown = _toml_repr(value) if not isinstance(value, (list, dict)) else ""
    return f"{kind} ({shown})" if shown else kind


def _number(value: int | float) -> str:
    """A number for a message: a huge integer by its size, not its hundreds of digits."""
    text = repr(value)
    return text if len(text) <= 24 else f"an integer of {len(text.lstrip('-'))} digits ({text[:6]}...)"


def convert(value: Any, tp: Any) -> Any:
    """``value`` converted to ``tp``; raises ValueError with a readable message."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        for a in allowed:
            if type(a) is type(value) and a == value:
                return value
        if isinstance(value, str):
            raise ValueError(f"'{value}' is not allowed; {did_you_mean(value, [str(a) for a in allowed])}")
        raise ValueError(f"expected {_type_name(tp)}, got {_value_desc(value)}")
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return convert(value, arg)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(f"expected {_type_name(tp)}, got {_value_desc(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not INT_MIN <= value <= INT_MAX:
                raise ValueError(f"must be a 64-bit integer, in [{INT_MIN}, {INT_MAX}], got {_number(value)}")
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"expected a finite number, got {value!r}")
            if abs(value) > FLOAT_MAX:  # an int too: float(10**400) would overflow
                raise ValueError(f"must be within float32's range, [-{FLOAT_MAX:.8g}, {FLOAT_MAX:.8g}], got {_number(value)}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (tuple, list):
        if isinstance(value, (list, tuple)):
            args = typing.get_args(tp)
            if len(args) == 2 and args[1] is Ellipsis:
                item_types = [args[0]] * len(value)
            elif args and origin is tuple:
                if len(args) != len(value):
                    raise ValueError(f"expected a list of {len(args)} values, got {len(value)}")
                item_types = list(args)
            else:
                item_types = [args[0] if args else Any] * len(value)
            out = []
            for i, (item, item_tp) in enumerate(zip(value, item_types)):
                try:
                    out.append(convert(item, item_tp))
                except ValueError as exc:
                    raise ValueError(f"item {i}: {exc}") from None
            return tuple(out) if origin is tuple else out
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        raise TypeError(f"unsupported option type {tp!r}")
    raise ValueError(f"expected {_type_name(tp)}, got {_value_desc(value)}")


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of an attrs class's fields."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in attrs.fields(cls)}


def structure(cls: type, table: Mapping[str, Any], where: str) -> tuple[Any, list[str]]:
    """Build ``cls`` from ``table``; returns ``(instance or None, problems)``.

    ``where`` prefixes each problem (``"recipe.toml: optimizer"``); unknown keys, wrong types,
    missing required keys and out-of-range values are all reported, one line each. A cross-field
    check in ``__attrs_post_init__`` names the key it is about by starting its message with it
    (``ValueError("momentum: must be > 0 while nesterov = true")``), which becomes the key path.
    """
    problems: list[str] = []
    fields = {f.name: f for f in attrs.fields(cls)}
    types_ = field_types(cls)
    values: dict[str, Any] = {}
    for key, raw in table.items():
        if key not in fields:
            problems.append(f"{where}.{key}: unknown key; {did_you_mean(key, fields)}")
            continue
        try:
            value = convert(raw, types_[key])
        except ValueError as exc:
            problems.append(f"{where}.{key}: {exc}")
            continue
        validator = fields[key].validator
        if validator is not None:
            try:
                validator(None, fields[key], value)
            except (ValueError, TypeError) as exc:
                problems.append(f"{where}.{key}: {exc}")
                continue
        values[key] = value
    for name, f in fields.items():
        if name not in table and f.default is NOTHING:
            problems.append(f"{where}.{name}: missing required key ({_type_name(types_[name])}: {doc(f)})")
    if problems:
        return None, problems
    try:
        return cls(**values), []
    except (ValueError, TypeError) as exc:  # a cross-field check in __attrs_post_init__
        return None, [cross_field_problem(str(exc), where, fields)]


def cross_field_problem(message: str, where: str, keys: Iterable[str]) -> str:
    """A cross-field check's message as a problem line: ``"key: text"`` about one of ``keys``
    reads ``"{where}.key: text"``, like every other problem; any other message follows ``where``."""
    key, sep, rest = message.partition(": ")
    if sep and key in keys:
        return f"{where}.{key}: {rest}"
    return f"{where}: {message}"


def doc(f: attrs.Attribute) -> str:
    """The one-line documentation of an option field."""
    return f.metadata.get("doc", "")


def describe_default(value: Any) -> str:
    """A default value as written in TOML (``-`` when required)."""
    if value is NOTHING:
        return "required"
    if isinstance(value, attrs.Factory):  # type: ignore[arg-type]
        value = value.factory()
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_repr(v) for v in value) + "]"
    return _toml_repr(value)


def as_table(instance: Any) -> dict[str, Any]:
    """An options instance as a plain TOML-ready table (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(i) for i in v]
        if isinstance(v, dict):
            return {k: plain(i) for k, i in v.items()}
        return v

    return {k: plain(v) for k, v in attrs.asdict(instance, recurse=False).items()}

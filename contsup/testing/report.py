"""What the checkers share: the component under test as an instance, and its problems, reported
together as one ``AssertionError`` of one line each."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import attrs

if TYPE_CHECKING:
    import torch

MAX_PROBLEMS = 20


class Problems:
    """Problems found so far; the same problem of the same module is one line listing every K."""

    def __init__(self, who: str, contract: str = "context selector") -> None:
        self.who = who
        self.contract = contract
        self.groups: dict[tuple[int | None, str], list[int]] = {}

    def add(self, text: str, module: int | None = None, k: int | None = None) -> None:
        ks = self.groups.setdefault((module, text), [])
        if k is not None and k not in ks:
            ks.append(k)

    @property
    def count(self) -> int:
        return len(self.groups)

    def lines(self) -> list[str]:
        out = []
        for (module, text), ks in self.groups.items():
            where = [f"module {module}"] if module is not None else []
            if ks:
                where.append(f"K = {ranges(ks)}")
            out.append(f"{', '.join(where)}: {text}" if where else text)
        return out

    def raise_if_any(self) -> None:
        lines = self.lines()
        if lines:
            shown = lines[:MAX_PROBLEMS]
            more = [f"... and {len(lines) - len(shown)} more"] if len(lines) > len(shown) else []
            raise AssertionError("\n".join([f"{self.who} breaks the {self.contract} contract:", *shown, *more]))


def ranges(values: Sequence[int]) -> str:
    """[2, 3, 4, 7] -> '2..4, 7'."""
    values = sorted(values)
    parts, start = [], values[0]
    for a, b in zip(values, [*values[1:], None]):
        if b != a + 1:
            parts.append(str(a) if a == start else f"{start}..{a}")
            start = b
    return ", ".join(parts)


def instance(component: Any) -> Any:
    """A component instance: ``component`` itself, or the class built with its default options."""
    if isinstance(component, type):
        options = getattr(component, "Options", None)
        if options is None or not attrs.has(options):
            raise AssertionError(f"{component.__name__} has no attrs 'Options' class; see docs/plugins/hooks.md")
        try:
            return component(options())
        except TypeError as exc:  # an option without a default
            raise AssertionError(
                f"{component.__name__}.Options() needs values ({exc}); give the checker an instance: {component.__name__}({component.__name__}.Options(...))"
            ) from None
    return component


def graph_leaves(loss: "torch.Tensor") -> list["torch.Tensor"]:
    """Every leaf tensor (parameter or other) that ``loss``'s graph reaches."""
    found, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            found.append(variable)
        stack.extend(fn for fn, _ in node.next_functions)
    return found


def who(kind: str, component: Any) -> str:
    """How a report names the component: ``partitioner 'name' (QualifiedClass)``."""
    return f"{kind} '{getattr(component, 'name', '?')}' ({type(component).__qualname__})"


__all__ = ["Problems", "ranges", "instance", "who", "graph_leaves", "MAX_PROBLEMS"]

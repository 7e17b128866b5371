"""The paper's published test errors (its Tables 2, 3, 9 and 11) and how a run is matched to them."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Mapping

import attrs

from contsup.core.registry import Registries, UnknownName
from contsup.options import structure

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TABLES = Path(__file__).with_name("paper_tables.toml")


@attrs.frozen
class Cell:
    """One published number: the configuration it belongs to and its error in percent."""

    table: str
    dataset: str
    backbone: str
    modules: int
    context: str
    objective: str
    decoder: str
    mode: str
    error: float
    std: float | None = None
    note: str = ""
    keys: dict = attrs.field(factory=dict)  # other key paths the configuration sets (a training method's table)

    def label(self) -> str:
        std = f" ± {self.std:.2f}" if self.std is not None else ""
        return f"{self.error:.2f}{std}"


@functools.lru_cache(maxsize=1)
def _tables() -> dict[str, Any]:
    return tomllib.loads(TABLES.read_text(encoding="utf-8"))


def cells() -> tuple[Cell, ...]:
    """Every published cell."""
    return tuple(Cell(**c) for c in _tables()["cell"])


_ABSENT = object()


def _lookup(recipe: Mapping[str, Any], path: str) -> Any:
    node: Any = recipe
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _differences(recipe: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The key paths whose value in ``recipe`` is not the wanted one (absent keys agree)."""
    return [k for k, v in wanted.items() if (have := _lookup(recipe, k)) is not _ABSENT and have != v]


def method_differences(recipe: Mapping[str, Any]) -> list[str]:
    """Keys where a resolved recipe is another method than the paper's (e.g. ``context.encoder =
    "fast"``, ``partition.use = "memory_balanced"``): its results are not comparable."""
    wanted = _tables()["method"]
    if _lookup(recipe, "run.mode") == "e2e":  # no local objective or decoder is trained
        wanted = {k: v for k, v in wanted.items() if not k.startswith(("objective.", "decoder."))}
    return _differences(recipe, wanted)


def paper_schedule(dataset: str) -> dict[str, Any]:
    """The paper's training schedule for ``dataset``: key path -> value."""
    return {**_tables()["schedule"], **_tables()["schedule_per_dataset"].get(dataset, {})}


def schedule_differences(recipe: Mapping[str, Any], dataset: str) -> list[str]:
    """Keys where a resolved recipe trains with another schedule than the paper's on ``dataset``
    (fewer epochs, another batch size or learning rate, ...)."""
    return _differences(recipe, paper_schedule(dataset))


def _context_matches(table: Mapping[str, Any], name: str, registries: Registries) -> bool:
    """Whether a resolved ``[context]`` table selects what the shorthand ``name`` does."""
    try:
        wanted = registries.context_selectors.resolve(name)
        have = registries.context_selectors.resolve(table.get("use", "none"))
    except UnknownName:
        return False
    if wanted.component is not have.component:
        return False
    effective = {**have.preset, **{k: v for k, v in table.items() if k != "use"}}
    return all(effective.get(k) == v for k, v in wanted.preset.items())


def _backbone(table: Mapping[str, Any]) -> str:
    return table.get("model", table.get("use", "")) if table.get("use") == "timm" else table.get("use", "")


def matching_cells(recipe: Mapping[str, Any], registries: Registries) -> list[Cell]:
    """The published cells for a resolved recipe table: empty for anything the paper did not run,
    including its configurations run as another method (:func:`method_differences`)."""
    if recipe.get("modules") or method_differences(recipe):  # hybrid schemes: no published counterpart here
        return []
    run = recipe.get("run", {})
    decoder = recipe.get("decoder", {}).get("use", "")
    out = []
    for cell in cells():
        if (
            recipe.get("data", {}).get("use") == cell.dataset
            and _backbone(recipe.get("backbone", {})) == cell.backbone
            and recipe.get("partition", {}).get("modules") == cell.modules
            and run.get("mode", "greedy") == cell.mode
            and (cell.mode == "e2e" or recipe.get("objective", {}).get("use") == cell.objective)
            and (cell.mode == "e2e" or decoder == cell.decoder)
            and _context_matches(recipe.get("context", {}), cell.context, registries)
            and all(_lookup(recipe, k) == v for k, v in cell.keys.items())
            and all(any(k.startswith(f"{name}.") for k in cell.keys) for name in active_methods(recipe, registries))
        ):
            out.append(cell)
    return out


def active_methods(recipe: Mapping[str, Any], registries: Registries) -> list[str]:
    """The training methods a resolved recipe table trains with (tables of inactive ones left out)."""
    out = []
    for name in registries.methods.names():
        table = recipe.get(name)
        if isinstance(table, Mapping):
            component = registries.methods.entry(name).component
            options, problems = structure(component.Options, dict(table), name)
            if options is not None and not problems and component(options).active():
                out.append(name)
    return out


def describe(found: list[Cell]) -> str:
    """A cell as shown beside a result: ``10.21 ± 0.45 (Table 2)``; several equal cells merge."""
    if not found:
        return ""
    by_error: dict[float, Cell] = {}
    for c in found:  # one label per distinct number, with its std where a table gives one
        if c.error not in by_error or (by_error[c.error].std is None and c.std is not None):
            by_error[c.error] = c
    tables = ", ".join(sorted({c.table.replace("Table ", "") for c in found}, key=int))
    prefix = "Table" if len({c.table for c in found}) == 1 else "Tables"
    text = " / ".join(by_error[e].label() for e in sorted(by_error)) + f" ({prefix} {tables})"
    notes = [c.note for c in found if c.note]
    return text + (" *" if notes else "")

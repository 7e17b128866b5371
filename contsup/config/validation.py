"""Validating a parsed recipe into a :class:`~contsup.config.schema.Recipe`: every section, the
``[[modules]]`` ranges and the checks that need several sections at once, every problem
collected into one :class:`~contsup.errors.RecipeError`."""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping, Sequence

import attrs

from contsup.config import loggers as log_choice
from contsup.config.optim import optimizers, schedules
from contsup.config.parts import build_parts, too_many_modules
from contsup.config.presets import apply_preset
from contsup.config.schema import SECTION, SECTIONS, STAGE_KEYS, TOP_LEVEL_KEYS, Chosen, ModuleRange, Recipe, Section
from contsup.core.registry import Registries, Registry, UnknownName
from contsup.core.requirements import check_requirements
from contsup.errors import ContsupError, RecipeError
from contsup.options import structure
from contsup.suggest import did_you_mean


def component_registry(kind: str, registries: Registries) -> Registry:
    if kind == "optimizers":
        return optimizers()
    if kind == "schedules":
        return schedules()
    return getattr(registries, kind)


def _read_section(
    section: Section, table: Mapping[str, Any], where: str, registries: Registries
) -> tuple[dict[str, Any], list[str]]:
    """Validate one table; returns ``{"own": ..., "chosen": ...}`` and problems."""
    problems: list[str] = []
    own_keys = {f.name for f in attrs.fields(section.own)}
    own_table = {k: v for k, v in table.items() if k in own_keys}
    rest = {k: v for k, v in table.items() if k not in own_keys and k != "use"}
    own, own_problems = structure(section.own, own_table, where)
    problems += own_problems
    result: dict[str, Any] = {"own": own, "chosen": None}
    if section.kind is None:
        for key in rest:
            problems.append(f"{where}.{key}: unknown key; {did_you_mean(key, own_keys)}")
        return result, problems
    use = table.get("use", section.default_use)
    if use is None:
        problems.append(f"{where}.use: missing required key (the {section.label} to use)")
        return result, problems
    if not isinstance(use, str):
        problems.append(f"{where}.use: expected a string naming the {section.label}, got {type(use).__name__}")
        return result, problems
    registry = component_registry(section.kind, registries)
    try:
        resolved = registry.resolve(use)
    except UnknownName as exc:
        problems.append(f"{where}.use: {exc}")
        return result, problems
    options_table = dict(resolved.preset)
    for key, value in rest.items():
        if key in resolved.preset and resolved.preset[key] != value:
            problems.append(
                f"{where}.{key}: conflicts with use = \"{use}\", which sets {key} = {resolved.preset[key]!r}; "
                f"use \"{resolved.component.name}\" to choose {key} yourself"
            )
        options_table[key] = value
    options_fields = {f.name for f in attrs.fields(resolved.component.Options)}
    for key in list(options_table):
        if key not in options_fields:
            known = own_keys | options_fields | {"use"}
            problems.append(f"{where}.{key}: unknown key for {section.name} '{use}'; {did_you_mean(key, known)}")
            del options_table[key]
    options, option_problems = structure(resolved.component.Options, options_table, where)
    problems += option_problems
    if options is not None:
        result["chosen"] = Chosen(use, resolved.component, options, resolved.plugin)
    return result, problems


def _option_fields(section: str, use: str | None, registries: Registries) -> Any:
    """The option names of the component ``use`` chooses in ``section`` (its default when None);
    None for a section without components, False when the name does not resolve."""
    spec = SECTION.get(section)
    if spec is None or spec.kind is None:
        return None
    use = use if use is not None else spec.default_use
    if not isinstance(use, str):
        return False
    try:
        resolved = component_registry(spec.kind, registries).resolve(use)
    except UnknownName:
        return False
    return {f.name for f in attrs.fields(resolved.component.Options)}


def build_recipe(data: Mapping[str, Any], source: str, registries: Registries, overridden: Sequence[str] = ()) -> Recipe:
    """Validate recipe ``data`` (already parsed and merged); raises RecipeError with every problem.
    A ``preset`` fills in the keys the recipe leaves out first (:mod:`contsup.config.presets`)."""
    data, problems = apply_preset(data, functools.partial(_option_fields, registries=registries))
    problems = [f"{source}: {p}" for p in problems]
    data = dict(data)
    data["log"], logger_tables = log_choice.split_tables(data.get("log", {}))
    names = [s.name for s in SECTIONS]
    methods = list(registries.methods.names())
    method_tables: list[Chosen] = []
    for key, value in data.items():
        if key in TOP_LEVEL_KEYS:
            continue
        if key not in names and key not in methods:
            problems.append(f"{source}: {key}: unknown section; {did_you_mean(key, names + methods)}")
        elif not isinstance(value, Mapping):
            problems.append(f"{source}: {key}: expected a table ([{key}]), got {type(value).__name__}")
        elif key in methods:
            chosen, method_problems = _read_method(key, value, f"{source}: {key}", registries)
            problems += method_problems
            if chosen is not None:
                method_tables.append(chosen)
    parts: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        table = data.get(section.name)
        if table is None and section.optional:
            parts[section.name] = {"own": None, "chosen": None}
            continue
        if not isinstance(table, Mapping):
            table = {}
        part, section_problems = _read_section(section, table, f"{source}: {section.name}", registries)
        parts[section.name] = part
        problems += section_problems
    if parts["run"]["own"] is not None:  # a missing plugin explains the problems it causes: first
        problems[:0] = check_requirements(parts["run"]["own"].requires, registries.plugins, f"{source}: run.requires")
    ranges: tuple[ModuleRange, ...] = ()
    if "modules" in data:
        ranges, range_problems = _read_ranges(data["modules"], parts, source, registries)
        problems += range_problems
    chosen_loggers: list = []
    if parts["log"]["own"] is not None:
        log = parts["log"]["own"]
        chosen_loggers, logger_problems = log_choice.choose(
            log.use, {key: getattr(log, key) for key in log_choice.SYNONYMS}, logger_tables, f"{source}: log", registries
        )
        problems += logger_problems
    problems += _cross_checks(parts, source)
    problems += _distributed_checks(parts, source)
    problems += _method_checks(method_tables, parts, source)
    if problems:
        raise RecipeError(_mark_overrides(problems, overridden, source))
    return Recipe(
        source=source,
        run=parts["run"]["own"],
        data=parts["data"]["own"],
        dataset=parts["data"]["chosen"],
        backbone=parts["backbone"]["chosen"],
        partition=parts["partition"]["own"],
        partitioner=parts["partition"]["chosen"],
        context=parts["context"]["chosen"],
        objective=parts["objective"]["chosen"],
        decoder=parts["decoder"]["chosen"],
        optimizer=parts["optimizer"]["chosen"],
        schedule=parts["schedule"]["chosen"],
        ranges=ranges,
        log=parts["log"]["own"],
        context_options=parts["context"]["own"],
        distributed=parts["distributed"]["own"],
        methods=tuple(sorted(method_tables, key=lambda m: m.use)),
        loggers=tuple(Chosen(*c) for c in chosen_loggers),
    )


def _read_method(name: str, table: Mapping[str, Any], where: str, registries: Registries) -> tuple[Chosen | None, list[str]]:
    """A training method's table ``[name]``: its options, each key checked as a component's are."""
    entry = registries.methods.entry(name)
    fields = {f.name for f in attrs.fields(entry.component.Options)}
    problems = [f"{where}.{key}: unknown key for method '{name}'; {did_you_mean(key, fields)}" for key in table if key not in fields]
    options, option_problems = structure(entry.component.Options, {k: v for k, v in table.items() if k in fields}, where)
    problems += option_problems
    return (Chosen(name, entry.component, options, entry.plugin) if options is not None else None), problems


def _method_checks(methods: Sequence[Chosen], parts: Mapping[str, Mapping[str, Any]], source: str) -> list[str]:
    """A recipe trains with one method at most, greedily, and in a pipeline only if the method can."""
    active = sorted((m for m in methods if m.create().active()), key=lambda m: m.use)
    if len(active) > 1:
        names = ", ".join(f"[{m.use}]" for m in active)
        return [f"{source}: {names}: a recipe trains with one method at a time; keep one of these tables (or make the others inactive)"]
    if not active:
        return []
    m = active[0]
    run, d = parts["run"]["own"], parts["distributed"]["own"]
    switch = getattr(m.component, "switch", None)
    where, off = (f"{m.use}.{switch}", f"set {m.use}.{switch} to turn it off") if switch else (m.use, f"leave out [{m.use}]")
    problems = []
    if run is not None and run.mode != "greedy":
        problems.append(f"{source}: {where}: the method '{m.use}' trains greedily, module by module: it needs run.mode = \"greedy\" ({off} for end-to-end training)")
    refusal = getattr(m.component, "pipeline_refusal", None)
    if refusal and d is not None and d.mode == "pipeline":
        problems.append(
            f"{source}: {where}: the method '{m.use}' is not available with distributed.mode = \"pipeline\" ({refusal}); "
            f"use distributed.mode = \"none\" or \"data\", or {off}"
        )
    return problems


def check_tiling(ranges: Sequence[tuple[int, int]], k: int) -> list[str]:
    """Problems with module ranges that must tile 1..k exactly: overlaps, gaps, out of bounds."""
    problems = []
    ordered = sorted(ranges)
    expected = 1
    for i, (first, last) in enumerate(ordered):
        if i > 0 and first <= ordered[i - 1][1]:
            problems.append(f"ranges {list(ordered[i - 1])} and {[first, last]} overlap")
        elif first > expected:
            problems.append(f"no range covers module{'s' if first - expected > 1 else ''} {_span(expected, first - 1)}")
        expected = max(expected, last + 1)
    if expected <= k:
        problems.append(f"no range covers module{'s' if k - expected > 0 else ''} {_span(expected, k)} (partition.modules = {k})")
    for first, last in ordered:
        if last > k:
            problems.append(f"range {[first, last]} goes past the last module (partition.modules = {k})")
    return problems


def _span(a: int, b: int) -> str:
    return str(a) if a == b else f"{a}..{b}"


def _read_ranges(
    items: Any, parts: Mapping[str, Mapping[str, Any]], source: str, registries: Registries
) -> tuple[tuple[ModuleRange, ...], list[str]]:
    """Validate ``[[modules]]``: each entry's range and tables; ranges must tile 1..K."""
    where = f"{source}: modules"
    if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items) or not items:
        return (), [f"{where}: expected [[modules]] tables, each with range = [first, last]"]
    problems: list[str] = []
    found, ranges = [], []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        for key in item:
            if key not in STAGE_KEYS:
                problems.append(f"{at}.{key}: unknown key; {did_you_mean(key, STAGE_KEYS)}")
        bounds = item.get("range")
        if (
            not isinstance(bounds, list)
            or len(bounds) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
            or not 1 <= bounds[0] <= bounds[1]
        ):
            problems.append(f"{at}.range: expected [first, last] module numbers with 1 <= first <= last, got {bounds!r}")
            continue
        chosen: dict[str, Any] = {}
        for name in ("context", "objective", "decoder"):
            table = item.get(name)
            if table is None:
                chosen[name] = parts[name]["chosen"]
                continue
            if not isinstance(table, Mapping):
                problems.append(f"{at}.{name}: expected a table like {{ use = \"...\" }}")
                continue
            part, section_problems = _read_section(SECTION[name], table, f"{at}.{name}", registries)
            problems += section_problems
            problems += [
                f"{at}.{name}.{key}: set it in the [{name}] section, where it applies to every module"
                for key in table if key in {f.name for f in attrs.fields(SECTION[name].own)}
            ]
            chosen[name] = part["chosen"]
        ranges.append((bounds[0], bounds[1]))
        if len(chosen) == 3 and chosen["context"] is not None and chosen["objective"] is not None:
            found.append(ModuleRange(bounds[0], bounds[1], chosen["context"], chosen["objective"], chosen["decoder"]))
    partition = parts["partition"]["own"]
    if partition is not None and len(ranges) == len(items):
        problems += [f"{where}: {p}" for p in check_tiling(ranges, partition.modules)]
    return tuple(sorted(found, key=lambda r: r.first)), problems


def count_units(backbone: Chosen, dataset: Chosen) -> int:
    """How many minimal units the backbone has for the dataset's input (built on the meta device)."""
    try:
        return _count_units_cached(backbone, dataset)
    except TypeError:  # options holding unhashable values: no caching
        return _count_units(backbone, dataset)


@functools.lru_cache(maxsize=256)
def _count_units_cached(backbone: Chosen, dataset: Chosen) -> int:
    return _count_units(backbone, dataset)


def _count_units(backbone: Chosen, dataset: Chosen) -> int:
    import torch  # here, not at the top: `contsup list` reads the registries and needs no torch

    return len(build_parts(backbone, dataset, within=torch.device("meta"), trace=False).units)


def _cross_checks(parts: Mapping[str, Mapping[str, Any]], source: str) -> list[str]:
    """Checks that need several sections at once: K against the backbone's unit count, made
    whenever the backbone, the dataset and K are themselves valid, whatever else is wrong."""
    backbone, dataset, partition = parts["backbone"]["chosen"], parts["data"]["chosen"], parts["partition"]["own"]
    if backbone is None or dataset is None or partition is None:
        return []
    k = partition.modules
    try:
        n = count_units(backbone, dataset)
    except ContsupError as exc:
        return [f"{source}: {line}" for line in exc.lines]
    problem = too_many_modules(k, n, backbone.use)
    return [f"{source}: {problem}"] if problem else []


def _distributed_checks(parts: Mapping[str, Mapping[str, Any]], source: str) -> list[str]:
    """What a pipeline needs of the rest of the recipe (the world size is checked at launch);
    each check is made when the sections it reads are themselves valid."""
    d, run, partition = parts["distributed"]["own"], parts["run"]["own"], parts["partition"]["own"]
    if d is None:
        return []
    problems = []
    if d.mode == "pipeline" and run is not None and run.mode != "greedy":
        problems.append(
            f"{source}: distributed.mode: \"pipeline\" trains each module on its own rank, which needs "
            f"run.mode = \"greedy\"; use distributed.mode = \"data\" for end-to-end training"
        )
    k = partition.modules if partition is not None else None
    if d.stages and k is not None and sum(d.stages) != k:
        problems.append(
            f"{source}: distributed.stages: {list(d.stages)} holds {sum(d.stages)} modules, partition.modules is {k}; "
            f"give counts summing to {k}, or [] to balance them automatically"
        )
    return problems


def _mark_overrides(problems: list[str], overridden: Sequence[str], source: str = "") -> list[str]:
    """Say ``(from --set KEY)`` on problems about keys that came from the command line: the
    problem's key path is KEY, a table holding it or a key inside it (``modules[0].range`` is
    ``modules.0.range``), a key beside the ``use`` KEY changed, or its text names KEY (``needs
    run.mode = "greedy"``) or, within KEY's table, KEY's last part (``momentum: must be > 0 while
    nesterov = true``)."""
    marked = []
    for problem in problems:
        rest = problem[len(source) + 2:] if source and problem.startswith(f"{source}: ") else problem
        about, _, text = rest.partition(": ")
        about = re.sub(r"\[(\d+)\]", r".\1", about)
        hit = next((k for k in overridden if _is_about(k, about, text)), None)
        marked.append(f"{problem} (from --set {hit})" if hit else problem)
    return marked


def _is_about(key: str, about: str, text: str) -> bool:
    if key == about or key.startswith(f"{about}.") or about.startswith(f"{key}."):
        return True
    if re.search(rf"(?<![\w.]){re.escape(key)}\b", text):
        return True
    table, _, leaf = key.rpartition(".")
    if leaf == "use" and about.startswith(f"{table}."):  # another component: its options are checked anew
        return True
    return bool(table) and about.rpartition(".")[0] == table and re.search(rf"(?<![\w.]){re.escape(leaf)} =", text) is not None

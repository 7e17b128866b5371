"""TOML recipes -> frozen attrs classes, with every problem collected into one error.

A recipe has one table per section. In a component table, ``use`` names the component and the
other keys are the section's own keys (e.g. ``batch_size`` in ``[data]``) or the component's
``Options``. ``extends = "base.toml"`` inherits another recipe; ``--set key.path=value``
overrides any key, the value parsed as a TOML literal (a bare word is taken as a string).
"""

from __future__ import annotations

import copy
import errno
import functools
import re
import sys
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import attrs

from contsup.errors import ContsupError, RecipeError
from contsup.config.optim import optimizers, schedules
from contsup.config.presets import apply_preset
from contsup.options import MAX_EPOCHS, as_table, at_least, between, option, requires_module, structure
from contsup.core.registry import Registries, Registry, UnknownName
from contsup.core.requirements import check_requirements
from contsup.suggest import did_you_mean
from contsup.core.plugins import get_plugin_manager
from contsup.core.files import RECIPE_LIMIT, read_file
from contsup.core.guard import Origin, origin_of
from contsup.core.guard import create as create_component

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


# -- the sections' own keys ----------------------------------------------------------------


@attrs.frozen
class RunOptions:
    """How the experiment runs."""

    seed: int = option(0, doc="seed for initialisation, data order and augmentation")
    epochs: int = option(10, doc="number of training epochs", validator=between(1, MAX_EPOCHS))
    device: str = option("auto", doc='"auto" (CUDA if present, else CPU), "cpu", "cuda" or "cuda:N"')
    out_dir: str = option("", doc='run directory; "" means runs/<recipe name>')
    mode: Literal["greedy", "e2e"] = option("greedy", doc='"greedy": local losses per module; "e2e": end-to-end backprop')
    log_every: int = option(0, doc="off a terminal, print a progress line every N steps (0: at most every 10 s)", validator=at_least(0))
    requires: tuple[str, ...] = option(
        (), doc='plugin distributions the recipe needs, e.g. ["contsup-geometric>=0.1"]; checked before anything runs'
    )
    checkpoint_every_steps: int = option(
        0, doc="also write a checkpoint every N optimizer steps (0: only at the end of every epoch)", validator=at_least(0)
    )
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", doc='"fp32"; "bf16" (autocast, CPU or CUDA); "fp16" (autocast and a grad scaler per module, CUDA only)'
    )
    channels_last: bool = option(False, doc="keep the network and its inputs in channels-last memory format (faster convolutions on recent GPUs)")
    deterministic: bool = option(
        False, doc="use deterministic algorithms only (torch and cuDNN); off, cuDNN picks the fastest algorithms on CUDA"
    )
    init: Literal["default", "official"] = option(
        "default", doc='"default": the backbone\'s own initialisation, heads, adapters and decoders PyTorch\'s; "official": '
        "every convolution (heads, adapters and decoders included) drawn from normal(0, sqrt(2 / (k*k*out_channels))) and "
        "every batch norm set to weight 1, bias 0, as the official code does (preset = \"official\")",
    )

    def __attrs_post_init__(self) -> None:
        d = self.device
        if not (d in ("auto", "cpu", "cuda", "mps") or (d.startswith("cuda:") and d[5:].isdigit())):
            raise ValueError(f"device: '{d}' is not a device; use \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"")


@attrs.frozen
class DataOptions:
    """Keys common to every dataset."""

    batch_size: int = option(128, doc="training batch size", validator=at_least(1))
    test_batch_size: int = option(0, doc="evaluation batch size (0: same as batch_size)", validator=at_least(0))
    workers: int = option(0, doc="data-loading worker processes", validator=between(0, 1024))
    drop_last: bool = option(
        False, doc="training: leave out each epoch's last batch when it is short (a batch of one image breaks "
        "batch norm; supcon needs two images of one class in every batch)"
    )


@attrs.frozen
class PartitionOptions:
    """Keys common to every partitioner."""

    modules: int = option(1, doc="K, the number of gradient-isolated modules", validator=at_least(1))


@attrs.frozen
class ContextOptions:
    """Keys common to every context selector: what the context adapters keep for backward."""

    recompute: bool = option(
        False, doc="the context adapters keep no activations for backward and run again during it (activation "
        "checkpointing of the adapters alone; the official M_E recomputes its second layer 16 output channels at a "
        "time): the same gradients, the adapters' memory no longer adds to the body's, one more adapter forward per "
        "step; the recomputation leaves batch-norm running statistics as the "
        "forward left them (docs/performance.md)",
    )
    recompute_head: bool = option(
        False, doc="the same for each module's head (the auxiliary classifier, and the backbone's head of the "
        "last module): it keeps only its input through the forward; the paper's one-conv heads (1c*f) recompute "
        "their conv layer 16 channels at a time, which lowers a step's peak; other heads are recomputed whole, "
        "while the module's units still hold theirs, which does not (docs/performance.md)",
    )


@attrs.frozen
class LogOptions:
    """Optional loggers, besides metrics.jsonl and the progress display."""

    tensorboard: bool = option(
        False,
        doc="write TensorBoard scalars to <run dir>/tensorboard (needs the tensorboard package: pip install 'contsup[tensorboard]')",
        validator=requires_module("tensorboard", "pip install 'contsup[tensorboard]'"),
    )


@attrs.frozen
class BacklinkOptions:
    """BackLink (Guo et al., 2023): module l+1's loss also trains the last units of module l
    (docs/objectives.md)."""

    units: int = option(
        0, doc="N: module l+1's loss back-propagates into the last N units of module l (2 <= l+1 <= K) and stops "
        "there; each of those units learns from the sum of both losses' gradients; 0: off (plain greedy)",
        validator=at_least(0),
    )


@attrs.frozen
class DistributedOptions:
    """Training on several processes started by torchrun (docs/distributed.md)."""

    mode: Literal["none", "data", "pipeline"] = option(
        "none", doc='"none": one process; "data": every rank holds the network and trains on its share of each batch; '
        '"pipeline": every rank trains its own group of modules'
    )
    stages: tuple[int, ...] = option(
        (), doc="pipeline: modules per stage, one entry per stage (per process without replicas), e.g. [3, 1]; [] balances them "
        "by measured time",
        validator=lambda _instance, _attribute, value: _positive_counts(value),
    )
    replicas: int = option(
        1, doc="pipeline: whole pipelines side by side (a grid of stages x replicas ranks), each on its share of "
        "every batch; the gradients of each stage are summed over the replicas",
        validator=at_least(1),
    )
    micro_batches: int = option(
        1, doc="pipeline: micro-batches per batch; gradients accumulate over them, one optimizer step per batch",
        validator=at_least(1),
    )
    max_in_flight: int = option(
        2, doc="pipeline: micro-batches a rank may have sent but not yet handed over (bounds memory)", validator=at_least(1)
    )
    sync_batchnorm: bool = option(
        True, doc="data, and pipeline replicas: batch-norm statistics over the whole batch, across ranks, as one "
        "process computes them"
    )
    timeout_s: float = option(
        300.0, doc="seconds a rank waits for another before reporting it lost",
        validator=between(1, 1_000_000_000),  # about 32 years; Python's timedelta ends at 8.6e13 s
    )
    backend: Literal["auto", "gloo", "nccl"] = option(
        "auto", doc='"auto": NCCL for CUDA tensors and gloo for CPU ones (gloo alone without CUDA); "gloo"; "nccl"'
    )


def _positive_counts(counts: Sequence[int]) -> None:
    if any(c < 1 for c in counts):
        raise ValueError(f"every stage needs at least one module, got {list(counts)}")


@attrs.frozen
class NoOptions:
    """A section without keys of its own."""


@attrs.frozen
class Section:
    """How one recipe table is read."""

    name: str
    own: type  # attrs class of the section's own keys
    label: str  # what ``use`` names, for messages and docs
    kind: str | None  # registry holding its components, None for a plain section
    default_use: str | None  # None: ``use`` is required
    optional: bool = False  # the whole table may be absent (decoder)


SECTIONS = (
    Section("run", RunOptions, "", None, None),
    Section("data", DataOptions, "dataset", "datasets", None),
    Section("backbone", NoOptions, "backbone", "backbones", None),
    Section("partition", PartitionOptions, "partitioner", "partitioners", "uniform"),
    Section("context", ContextOptions, "context selector", "context_selectors", "none"),
    Section("objective", NoOptions, "local objective", "objectives", "cross_entropy"),
    Section("decoder", NoOptions, "decoder", "decoders", None, optional=True),
    Section("optimizer", NoOptions, "optimizer", "optimizers", "sgd"),
    Section("schedule", NoOptions, "learning-rate schedule", "schedules", "cosine"),
    Section("log", LogOptions, "", None, None),
    Section("backlink", BacklinkOptions, "", None, None),
    Section("distributed", DistributedOptions, "", None, None),
)
TOP_LEVEL_KEYS = ("extends", "modules", "preset")
SECTION = {s.name: s for s in SECTIONS}
STAGE_KEYS = ("range", "context", "objective", "decoder")


@attrs.frozen
class Chosen:
    """A component chosen in a recipe: its name, class, validated options and plugin."""

    use: str
    component: type
    options: Any
    plugin: str
    # where a third-party component comes from; its instances are then guarded (contsup.core.guard)
    origin: Origin | None = attrs.field(default=None, eq=False, repr=False)

    def create(self) -> Any:
        """A fresh instance of the component with its options (a third-party one seen through
        :class:`~contsup.core.guard.Guarded`: its failures name the plugin)."""
        return create_component(self.component, self.options, self.origin)


@attrs.frozen
class Stage:
    """Modules ``first``..``last`` (1-based, inclusive) and the components they use."""

    first: int
    last: int
    context: Chosen
    objective: Chosen
    decoder: Chosen | None

    def table(self, defaults: "Recipe") -> dict[str, Any]:
        """This stage as a ``[[modules]]`` entry: the range and the tables that differ from the
        recipe's own sections."""
        out: dict[str, Any] = {"range": [self.first, self.last]}
        for name in ("context", "objective", "decoder"):
            chosen = getattr(self, name)
            if chosen is not None and chosen != getattr(defaults, name):
                out[name] = _chosen_table(chosen)
        return out


def _chosen_table(chosen: Chosen, own: Any = None) -> dict[str, Any]:
    table: dict[str, Any] = {"use": chosen.use}
    if own is not None:
        table.update(as_table(own))
    table.update(as_table(chosen.options))
    return table


@attrs.frozen
class Recipe:
    """A validated recipe. ``table()`` gives it back as TOML-ready data with every default."""

    source: str  # the file it came from ("<string>" when loaded from text)
    run: RunOptions
    data: DataOptions
    dataset: Chosen
    backbone: Chosen
    partition: PartitionOptions
    partitioner: Chosen
    context: Chosen
    objective: Chosen
    decoder: Chosen | None
    optimizer: Chosen
    schedule: Chosen
    stages: tuple[Stage, ...] = ()  # from [[modules]]; empty: every module uses the sections above
    log: LogOptions = attrs.field(factory=LogOptions)
    context_options: ContextOptions = attrs.field(factory=ContextOptions)  # [context]'s own keys
    backlink: BacklinkOptions = attrs.field(factory=BacklinkOptions)
    distributed: DistributedOptions = attrs.field(factory=DistributedOptions)

    @property
    def name(self) -> str:
        """The recipe's file name without suffix."""
        return Path(self.source).stem

    def table(self) -> dict[str, Any]:
        """The resolved recipe: every section, every key, defaults filled in."""
        out: dict[str, Any] = {"run": as_table(self.run)}
        pairs = [
            ("data", self.data, self.dataset),
            ("backbone", None, self.backbone),
            ("partition", self.partition, self.partitioner),
            ("context", self.context_options, self.context),
            ("objective", None, self.objective),
            ("decoder", None, self.decoder),
            ("optimizer", None, self.optimizer),
            ("schedule", None, self.schedule),
        ]
        for name, own, chosen in pairs:
            if chosen is not None:
                out[name] = _chosen_table(chosen, own)
        if self.stages:
            out["modules"] = [stage.table(self) for stage in self.stages]
        out["log"] = as_table(self.log)
        out["backlink"] = as_table(self.backlink)
        out["distributed"] = as_table(self.distributed)
        return out

    def stage(self, module: int) -> Stage:
        """The components of 1-based ``module``: its ``[[modules]]`` range, else the sections."""
        for stage in self.stages:
            if stage.first <= module <= stage.last:
                return stage
        return Stage(1, self.partition.modules, self.context, self.objective, self.decoder)

    def providers(self) -> dict[str, dict[str, str]]:
        """``{plugin: {table: name}}``: which plugin provides each component the recipe names
        (``{"contsup_context": {"context": "R1E"}}``); ``[[modules]]`` tables as ``modules[i].context``."""
        chosen = [("data", self.dataset), ("backbone", self.backbone), ("partition", self.partitioner),
                  ("context", self.context), ("objective", self.objective), ("decoder", self.decoder)]
        for i, stage in enumerate(self.stages):
            for name in ("context", "objective", "decoder"):
                if getattr(stage, name) != getattr(self, name):
                    chosen.append((f"modules[{i}].{name}", getattr(stage, name)))
        out: dict[str, dict[str, str]] = {}
        for table, c in chosen:
            if c is not None and c.plugin != "contsup":  # "contsup": the engine's own (optimizers, schedules)
                out.setdefault(c.plugin, {})[table] = c.use
        return out


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
        raw = read_file(path, RECIPE_LIMIT, "a recipe")  # a regular file only: a FIFO or /dev/zero would never end
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
        origin = origin_of(resolved.component, registries.plugins.get(resolved.plugin), section.kind, section.label, use)
        result["chosen"] = Chosen(use, resolved.component, options, resolved.plugin, origin)
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
    names = [s.name for s in SECTIONS]
    for key, value in data.items():
        if key in TOP_LEVEL_KEYS:
            continue
        if key not in names:
            problems.append(f"{source}: {key}: unknown section; {did_you_mean(key, names)}")
        elif not isinstance(value, Mapping):
            problems.append(f"{source}: {key}: expected a table ([{key}]), got {type(value).__name__}")
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
    stages: tuple[Stage, ...] = ()
    if "modules" in data:
        stages, stage_problems = _read_stages(data["modules"], parts, source, registries)
        problems += stage_problems
    problems += _cross_checks(parts, source)
    problems += _distributed_checks(parts, source)
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
        stages=stages,
        log=parts["log"]["own"],
        context_options=parts["context"]["own"],
        backlink=parts["backlink"]["own"],
        distributed=parts["distributed"]["own"],
    )


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


def _read_stages(
    items: Any, parts: Mapping[str, Mapping[str, Any]], source: str, registries: Registries
) -> tuple[tuple[Stage, ...], list[str]]:
    """Validate ``[[modules]]``: each entry's range and tables; ranges must tile 1..K."""
    where = f"{source}: modules"
    if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items) or not items:
        return (), [f"{where}: expected [[modules]] tables, each with range = [first, last]"]
    problems: list[str] = []
    stages, ranges = [], []
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
            stages.append(Stage(bounds[0], bounds[1], chosen["context"], chosen["objective"], chosen["decoder"]))
    partition = parts["partition"]["own"]
    if partition is not None and len(ranges) == len(items):
        problems += [f"{where}: {p}" for p in check_tiling(ranges, partition.modules)]
    return tuple(sorted(stages, key=lambda s: s.first)), problems


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

    info = dataset.create().info()
    with torch.device("meta"):
        parts = backbone.create().build(tuple(info.input_shape), info.num_classes)
    return len(parts.units)


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
    if k > n:
        return [
            f"{source}: partition.modules: {k} is more than the {n} minimal units of backbone "
            f"'{backbone.use}'; use 1..{n}"
        ]
    return []


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
    b = parts["backlink"]["own"]
    if b is not None and b.units > 0 and d.mode == "pipeline":
        problems.append(
            f"{source}: backlink.units: BackLink is not available with distributed.mode = \"pipeline\" yet "
            f"(module l+1's loss would cross ranks); use backlink.units = 0 or distributed.mode = \"none\" or \"data\""
        )
    if b is not None and b.units > 0 and run is not None and run.mode != "greedy":
        problems.append(f"{source}: backlink.units: BackLink needs run.mode = \"greedy\"; use backlink.units = 0")
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


def load_recipe(path: str | Path, overrides: Sequence[str] = (), registries: Registries | None = None) -> Recipe:
    """Read, merge, override and validate the recipe at ``path``."""
    if registries is None:
        registries = Registries.from_plugin_manager(get_plugin_manager())
    data = load_with_extends(Path(path))
    if is_sweep(data):
        raise RecipeError([
            f"{path}: a sweep file ([sweep] and [axes]), not a recipe; check every combination with: "
            f"contsup sweep {path} --dry-run"
        ])
    data, keys, problems = apply_overrides(data, overrides)
    try:
        recipe = build_recipe(data, str(path), registries, keys)
    except RecipeError as exc:  # a malformed --set is one more problem, reported with the rest
        raise RecipeError([*problems, *exc.problems]) from None
    if problems:
        raise RecipeError(problems)
    return recipe


def loads_recipe(text: str, registries: Registries, source: str = "<string>") -> Recipe:
    """Validate a recipe given as TOML text."""
    return build_recipe(parse_toml(text, source), source, registries)

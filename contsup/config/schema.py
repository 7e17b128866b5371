"""The recipe's shape: each section's own keys, the sections, a chosen component and the
validated, frozen :class:`Recipe` (``table()`` gives it back as TOML-ready data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import attrs

from contsup.config.early_stop import check_table as early_stop_table
from contsup.options import MAX_EPOCHS, as_table, at_least, between, option, requires_module


# -- the sections' own keys ----------------------------------------------------------------


@attrs.frozen
class RunOptions:
    """How the experiment runs."""

    seed: int = option(0, doc="seed for initialisation, data order and augmentation")
    epochs: int = option(10, doc="number of training epochs", validator=between(1, MAX_EPOCHS))
    early_stop: dict[str, Any] = option(
        {}, doc='end the run as finished when a metric stops improving: {metric = "test_error_pct", patience = 3}, '
        'also min_delta (default 0) and mode ("auto", "min", "max"); {}: train every epoch (docs/runs.md#early-stopping)',
        validator=early_stop_table,
    )
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
    """Keys common to every context selector: what the context adapters and heads keep for backward.

    Recomputing is activation checkpointing of the adapters (or heads) alone: the same gradients,
    one more forward of each per step, and batch-norm running statistics as the forward left
    them. The official M_E recomputes its second layer 16 output channels at a time, so its
    memory no longer adds to the module body's. Of the heads, the paper's one-conv heads (1c*f)
    recompute their conv layer in channel chunks too, which lowers a step's peak; other heads are
    recomputed whole while the module's units still hold theirs, which does not. docs/performance.md
    measures both.
    """

    recompute: bool = option(
        False, doc="the context adapters keep only their inputs for backward and run again during it",
    )
    recompute_head: bool = option(
        False, doc="each module's head (auxiliary, or the backbone's for the last module) keeps only its input and runs again in backward",
    )


@attrs.frozen
class LogOptions:
    """Optional loggers, besides metrics.jsonl and the progress display; a table [log.NAME]
    holds logger NAME's options (docs/runs.md#logging)."""

    use: tuple[str, ...] = option(
        (), doc='loggers that record every epoch, e.g. ["csv", "mlflow"] (contsup list loggers); their options '
        "go in [log.NAME] tables",
    )
    tensorboard: bool = option(
        False,
        doc="write TensorBoard scalars to <run dir>/tensorboard, as naming \"tensorboard\" in use does (needs the tensorboard "
        "package: pip install 'contsup[tensorboard]')",
        validator=requires_module("tensorboard", "pip install 'contsup[tensorboard]'"),
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
    Section("distributed", DistributedOptions, "", None, None),
)
TOP_LEVEL_KEYS = ("extends", "modules", "preset")
# Any other table names a training method (the registry of methods says which: docs/plugins/methods.md).
SECTION = {s.name: s for s in SECTIONS}
STAGE_KEYS = ("range", "context", "objective", "decoder")


@attrs.frozen
class Chosen:
    """A component chosen in a recipe: its name, class, validated options and plugin."""

    use: str
    component: type
    options: Any
    plugin: str

    def create(self) -> Any:
        """A fresh instance of the component with its options."""
        return self.component(self.options)


@attrs.frozen
class ModuleRange:
    """Modules ``first``..``last`` (1-based, inclusive) and the components they use."""

    first: int
    last: int
    context: Chosen
    objective: Chosen
    decoder: Chosen | None

    def table(self, defaults: "Recipe") -> dict[str, Any]:
        """This range as a ``[[modules]]`` entry: the range and the tables that differ from the
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
    ranges: tuple[ModuleRange, ...] = ()  # from [[modules]]; empty: every module uses the sections above
    log: LogOptions = attrs.field(factory=LogOptions)
    context_options: ContextOptions = attrs.field(factory=ContextOptions)  # [context]'s own keys
    distributed: DistributedOptions = attrs.field(factory=DistributedOptions)
    loggers: tuple[Chosen, ...] = ()  # [log] use (and tensorboard = true), with their [log.NAME] options
    methods: tuple[Chosen, ...] = ()  # the training methods' tables the recipe has, active or not

    @property
    def method(self) -> Chosen | None:
        """The training method the recipe trains with (validation allows one at most), or None."""
        return next((m for m in self.methods if m.create().active()), None)

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
        if self.ranges:
            out["modules"] = [r.table(self) for r in self.ranges]
        out["log"] = as_table(self.log) | {c.use: as_table(c.options) for c in self.loggers if attrs.fields(type(c.options))}
        for m in self.methods:
            out[m.use] = as_table(m.options)
        out["distributed"] = as_table(self.distributed)
        return out

    def module_range(self, module: int) -> ModuleRange:
        """The components of 1-based ``module``: its ``[[modules]]`` range, else the sections."""
        for r in self.ranges:
            if r.first <= module <= r.last:
                return r
        return ModuleRange(1, self.partition.modules, self.context, self.objective, self.decoder)

    def providers(self) -> dict[str, dict[str, str]]:
        """``{plugin: {table: name}}``: which plugin provides each component the recipe names
        (``{"contsup_context": {"context": "R1E"}}``); ``[[modules]]`` tables as ``modules[i].context``."""
        chosen = [("data", self.dataset), ("backbone", self.backbone), ("partition", self.partitioner),
                  ("context", self.context), ("objective", self.objective), ("decoder", self.decoder),
                  *((m.use, m) for m in self.methods)]
        for i, r in enumerate(self.ranges):
            for name in ("context", "objective", "decoder"):
                if getattr(r, name) != getattr(self, name):
                    chosen.append((f"modules[{i}].{name}", getattr(r, name)))
        out: dict[str, dict[str, str]] = {}
        for table, c in chosen:
            if c is not None and c.plugin != "contsup":  # "contsup": the engine's own (optimizers, schedules)
                out.setdefault(c.plugin, {})[table] = c.use
        return out

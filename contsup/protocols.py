"""What each kind of component must provide. Structural typing: no base class is required.

Every component class has a ``name`` (its recipe name), an ``Options`` frozen attrs class (its
recipe keys) and is constructed as ``Component(options)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Sequence, runtime_checkable

from contsup.types import BackboneParts, Costs, DatasetInfo, HeadSpec, NetworkLayout, Shape, Source

if TYPE_CHECKING:  # annotations only: importing torch takes seconds
    import torch
    from torch import nn


@runtime_checkable
class Backbone(Protocol):
    name: ClassVar[str]
    Options: ClassVar[type]

    def build(self, input_shape: Shape, num_classes: int) -> BackboneParts:
        """A fresh network as minimal units (stem, then each residual block) and a head."""


@runtime_checkable
class Partitioner(Protocol):
    name: ClassVar[str]
    Options: ClassVar[type]

    def split(self, costs: Costs, k: int) -> tuple[int, ...]:
        """K positive unit counts summing to ``len(costs.units)``, in order."""

    # Optional: ``needs_costs = True`` (a class attribute) asks for measured costs (saved-tensor
    # bytes per unit and each module's own overhead, ``contsup.model.costs``); without it
    # ``costs.units`` is 1.0 per unit, a placeholder marked ``costs.measured = False``.
    # ``cost_batch_size`` (an int, or None for ``data.batch_size``) sets the batch those costs are
    # measured at. ``needs_flops = True`` asks for ``costs.flops`` (forward FLOPs per image, per
    # unit); the network's shapes (``costs.unit_shapes``, ``stages``, ``layout(sizes)``) come
    # always. ``balances(costs) -> Costs`` says which costs the split balances: its largest
    # module of them is never above the uniform split's (``contsup.testing.check_partitioner``).


@runtime_checkable
class ContextSelector(Protocol):
    name: ClassVar[str]
    Options: ClassVar[type]

    def sources(self, module: int, num_modules: int) -> tuple[Source, ...]:
        """The sources of 1-based ``module``: the input and/or features h_j^c with j <= module-2.

        A selector may instead define ``sources(module, num_modules, layout)`` (a third
        parameter, or one named ``layout``; see :class:`LayoutContextSelector`): it is then
        given the :class:`~contsup.types.NetworkLayout` of the split the partitioner chose
        (each module's input and output shape, unit range and stage). The engine looks at the
        signature, so two-argument selectors keep working unchanged."""

    # Optional: ``adapter(source, source_shape, target_shape) -> nn.Module | None`` builds the
    # adapter M_{l,s} for one source; None (or no such method) uses the paper's M_E / M_R.


@runtime_checkable
class LayoutContextSelector(Protocol):
    """A context selector that reads the network's layout (the ``stage`` selector is one)."""

    name: ClassVar[str]
    Options: ClassVar[type]

    def sources(self, module: int, num_modules: int, layout: NetworkLayout) -> tuple[Source, ...]:
        """The sources of 1-based ``module`` of ``layout.num_modules == num_modules`` modules."""


@runtime_checkable
class Objective(Protocol):
    name: ClassVar[str]
    Options: ClassVar[type]

    def head(self, spec: HeadSpec) -> nn.Module:
        """The auxiliary head A_l for a module whose output has ``spec.shape``."""

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Scalar local loss of the head's output ``z`` (B, D) against labels ``y`` (B,)."""

    def predict(self, z: torch.Tensor) -> torch.Tensor | None:
        """Predicted labels (B,) from ``z``, or None when the head does not classify."""


@runtime_checkable
class Decoder(Protocol):
    name: ClassVar[str]
    Options: ClassVar[type]

    def build(self, feature_shape: Shape, info: DatasetInfo) -> nn.Module:
        """A module reconstructing x from h_l: (B, C, H, W) -> (B, *info.input_shape)."""

    def loss(self, reconstruction: torch.Tensor, x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
        """Scalar reconstruction loss against the (normalised) input ``x``."""

    def weights(self, module: int, num_modules: int) -> tuple[float, float]:
        """(weight of the reconstruction loss, weight of the local objective) for ``module``."""


@runtime_checkable
class Dataset(Protocol):
    name: ClassVar[str]
    Options: ClassVar[type]

    def info(self) -> DatasetInfo:
        """Shape, classes and normalisation, without reading any data file."""

    def load(self, train: bool) -> Any:
        """A map-style dataset of (x: (C, H, W) float tensor, y: int) pairs."""

    # Optional: ``classes() -> tuple[str, ...]``, the class names in label order; a run writes
    # them to ``classes.json``. ``image_transform() -> Callable[[PIL.Image.Image], Tensor]``: one
    # image file -> the (C, H, W) tensor the test split would hold for it (``contsup predict``
    # takes runs of datasets that have one); it raises ValueError saying what an image it cannot
    # take is (its size, its mode) and what it takes. An item that cannot be read raises
    # ``contsup.errors.UnreadableData`` naming the file: the run stops on it with a checkpoint
    # (exit status 1).


@runtime_checkable
class Logger(Protocol):
    """Records every epoch of a run somewhere besides metrics.jsonl (a file, a tracking server).
    One instance per run, made from the recipe's ``[log.NAME]`` options when the run starts;
    heavy packages are imported in ``on_run_start``, never at import time."""

    name: ClassVar[str]
    Options: ClassVar[type]

    def on_run_start(self, run: "RunState") -> None:
        """Before the first epoch; ``run.epoch`` > 0 when a run resumes (forget what was logged
        after that epoch: it is trained again)."""

    def on_epoch_end(self, run: "RunState", epoch: int, metrics: dict) -> None:
        """After every epoch, its metrics written and its checkpoint saved: ``metrics`` is the
        epoch's line of metrics.jsonl."""

    def on_run_end(self, run: "RunState", metrics: dict | None) -> None:
        """After the last epoch (also when the run stopped early); ``metrics`` the last epoch's."""

    # Optional: ``requires: ClassVar[tuple[tuple[str, str], ...]]``, (module, how to install it)
    # pairs: a recipe naming the logger is refused at validation, in one line with the install
    # command, when a module is missing.


@runtime_checkable
class Method(Protocol):
    """A training method: what it changes in the greedy step (docs/plugins/methods.md). Its
    recipe table is ``[name]`` (with the method's options as its keys); a recipe trains with one
    method at most.

    Everything but :meth:`active` is optional, each with the default that leaves plain greedy
    training as it is:

    - ``part(spec, objective) -> nn.Module | None``: module l's own extra part (trained by module
      l's optimizer where its parameters require grad; kept in checkpoints either way), built for
      ``spec`` (the module's :class:`~contsup.types.HeadSpec`). The part may define
      ``feature(h) -> Tensor`` (what the module's head and decoder read instead of h_l) and
      ``extra_loss(h, y, x) -> Tensor`` (a second loss, passed to ``terms``). Default: None.
    - ``link(module, num_modules, units) -> int``: how many of module ``module``'s last ``units``
      units the loss of module ``module + 1`` reaches (its linked term flows through them and
      stops at their detached input; module ``module`` steps after that backward). Default 0.
    - ``terms(module, num_modules, total, extra) -> (linked, own)``: the module's loss split into
      the term that reaches back through the previous module's link and the term that stays in
      the module (either may be None: no such term). ``total`` is the module's usual loss
      (objective and decoder), ``extra`` the part's ``extra_loss`` (or None). Default ``(total, None)``.
    - ``after_step(module, network) -> None``: called after module ``module``'s optimizer step
      (and before the next module's), given the whole network; nothing may keep a reference to
      another module's units between calls. Default: nothing.
    - ``pipeline_refusal: ClassVar[str]``: why the method cannot run in a pipeline (say it in a
      few words); absent: it can.
    - ``describe() -> Any``: one JSON value tools show for the method (bench variants), and
      ``label() -> str`` the same in words (``contsup profile``).
    - ``switch: ClassVar[str]``: the option that turns the method off (BackLink's ``units = 0``),
      which refusals name; absent: the table's presence turns it on.
    - ``plan_note: ClassVar[str]``: what ``contsup plan`` says of the units a link reaches.
    - ``prepare(network) -> None``: called once the network is built and initialised.
    """

    name: ClassVar[str]
    Options: ClassVar[type]

    def active(self) -> bool:
        """Whether the recipe trains with the method; an inactive table trains plain greedy."""


@runtime_checkable
class RunState(Protocol):
    """What observers (``on_run_start``, ``on_epoch_end``, ``on_run_end``) receive about a run."""

    recipe: Any  # the run's contsup.config.recipe.Recipe
    run_dir: Path
    network: nn.Module  # the GreedyNetwork being trained
    plans: list  # one contsup.model.network.ModulePlan per module
    device: torch.device
    epoch: int  # the epoch in progress (at on_run_start: the epochs already done)
    step: int  # optimizer steps done


__all__ = [
    "RunState",
    "Backbone",
    "Partitioner",
    "ContextSelector",
    "LayoutContextSelector",
    "Objective",
    "Decoder",
    "Dataset",
    "Method",
    "Logger",
    "Sequence",
]

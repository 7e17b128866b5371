"""The hooks a contsup plugin can implement. Each ``register_*`` hook calls ``register(cls)``
once per component class it provides (the class, not an instance: the engine builds it as
``cls(options)`` from the recipe); observers receive the run and return nothing.

A component class has a ``name`` (its recipe name), an ``Options`` frozen attrs class (its recipe
keys, typed and validated) and the methods of its kind: :mod:`contsup.protocols` spells each kind
out, and ``contsup.testing`` checks a class against it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from contsup.protocols import RunState

hookspec = pluggy.HookspecMarker("contsup")
hookimpl = pluggy.HookimplMarker("contsup")

Register = Callable[[type], None]
"""``register(cls)``: adds one component class to its kind's registry (a name taken by another
plugin is an error naming both)."""


@hookspec
def register_backbones(register: Register) -> None:
    """Register backbone classes (:class:`contsup.protocols.Backbone`): networks split into
    ordered minimal units and a head.

    ``register``: call it once per class."""


@hookspec
def register_partitioners(register: Register) -> None:
    """Register partitioner classes (:class:`contsup.protocols.Partitioner`): cut a backbone's
    units into K contiguous modules.

    ``register``: call it once per class."""


@hookspec
def register_context_selectors(register: Register) -> None:
    """Register context selector classes (:class:`contsup.protocols.ContextSelector`): which
    sources each module's input is enriched with, and optionally their adapters.

    ``register``: call it once per class."""


@hookspec
def register_objectives(register: Register) -> None:
    """Register local objective classes (:class:`contsup.protocols.Objective`): an auxiliary
    head and its loss.

    ``register``: call it once per class."""


@hookspec
def register_decoders(register: Register) -> None:
    """Register decoder classes (:class:`contsup.protocols.Decoder`): a reconstruction loss of
    the input from a module's output.

    ``register``: call it once per class."""


@hookspec
def register_datasets(register: Register) -> None:
    """Register dataset classes (:class:`contsup.protocols.Dataset`): train/test data with
    shape, classes and normalisation.

    ``register``: call it once per class."""


@hookspec
def register_methods(register: Register) -> None:
    """Register training method classes (:class:`contsup.protocols.Method`): what a method adds
    to the greedy step (parts of its own, a link back into the previous module, loss terms, a
    hook after each module's step); the recipe names a method by its table, ``[name]``.

    ``register``: call it once per class."""


@hookspec
def register_loggers(register: Register) -> None:
    """Register logger classes (:class:`contsup.protocols.Logger`): what a run records of every
    epoch besides metrics.jsonl, chosen by the recipe's ``[log] use = [...]``.

    ``register``: call it once per class."""


@hookspec
def on_run_start(run: RunState) -> None:
    """Called once before the first epoch (on a distributed run, on rank 0 only).

    ``run``: the recipe, run directory, network and device (:class:`contsup.protocols.RunState`);
    ``run.epoch`` is the number of epochs already done (> 0 when a run resumes)."""


@hookspec
def on_epoch_end(run: RunState, epoch: int, metrics: dict) -> None:
    """Called after every epoch, once its metrics are written and its checkpoint saved.

    ``run``: as for :func:`on_run_start`; ``epoch``: the epoch just finished (1-based);
    ``metrics``: that epoch's line of metrics.jsonl (docs/runs.md lists every field)."""


@hookspec
def on_run_end(run: RunState, metrics: dict | None) -> None:
    """Called once after the last epoch.

    ``run``: as for :func:`on_run_start`; ``metrics``: the last epoch's metrics, None when no
    epoch was left to train."""

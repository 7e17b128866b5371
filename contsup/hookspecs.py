"""The hooks a contsup plugin can implement. Each ``register_*`` hook calls ``register(cls)``
once per component class it provides; observers receive the run and return nothing."""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("contsup")
hookimpl = pluggy.HookimplMarker("contsup")


@hookspec
def register_backbones(register):
    """Register backbone classes: networks split into ordered minimal units and a head."""


@hookspec
def register_partitioners(register):
    """Register partitioner classes: cut a backbone's units into K contiguous modules."""


@hookspec
def register_context_selectors(register):
    """Register context selector classes: which sources each module's input is enriched with."""


@hookspec
def register_objectives(register):
    """Register local objective classes: an auxiliary head and its loss."""


@hookspec
def register_decoders(register):
    """Register decoder classes: a reconstruction loss of the input from a module's output."""


@hookspec
def register_datasets(register):
    """Register dataset classes: train/test data with shape, classes and normalisation."""


@hookspec
def on_run_start(run):
    """Called once before the first epoch; ``run`` is a :class:`contsup.training.loop.RunInfo`."""


@hookspec
def on_epoch_end(run, epoch, metrics):
    """Called after every epoch with that epoch's metrics (the dict written to metrics.jsonl)."""


@hookspec
def on_run_end(run, metrics):
    """Called once after training with the last epoch's metrics (None if no epoch finished)."""

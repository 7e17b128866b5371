"""Optimizers and learning-rate schedules: part of the engine, chosen by name in a recipe."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable

import attrs

from contsup.options import at_least, greater_than, in_range, option
from contsup.core.registry import Registry

if TYPE_CHECKING:  # annotations only: validating a recipe needs no torch
    import torch


class SGD:
    """Stochastic gradient descent with (Nesterov) momentum and L2 weight decay."""

    name = "sgd"

    @attrs.frozen
    class Options:
        lr: float = option(0.1, doc="initial learning rate (after warm-up)", validator=greater_than(0))
        momentum: float = option(0.9, doc="momentum factor", validator=in_range(0.0, 1.0, high_open=True))
        nesterov: bool = option(True, doc="use Nesterov momentum (needs momentum > 0)")
        weight_decay: float = option(1e-4, doc="L2 weight decay", validator=at_least(0.0))

        def __attrs_post_init__(self) -> None:
            if self.nesterov and self.momentum == 0:
                raise ValueError("momentum: must be > 0 while nesterov = true, got 0.0; raise it, or set nesterov = false")

    def __init__(self, options: "SGD.Options") -> None:
        self.options = options

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        import torch

        o = self.options
        return torch.optim.SGD(
            list(params), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
        )


class Cosine:
    """Linear warm-up from 0, then cosine decay to ``final_ratio`` x lr, stepped every batch."""

    name = "cosine"

    @attrs.frozen
    class Options:
        warmup_epochs: float = option(0.0, doc="epochs of linear warm-up before the cosine decay", validator=at_least(0))
        final_ratio: float = option(0.0, doc="learning rate at the end, as a fraction of lr", validator=in_range(0.0, 1.0))

    def __init__(self, options: "Cosine.Options") -> None:
        self.options = options

    def factor(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        """The lr multiplier at 0-based ``step``."""
        warm = int(round(self.options.warmup_epochs * steps_per_epoch))
        if step < warm:
            return (step + 1) / warm
        span = max(1, total_steps - warm)
        progress = min(1.0, (step - warm) / span)
        final = self.options.final_ratio
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


class Constant:
    """Linear warm-up, then a constant learning rate."""

    name = "constant"

    @attrs.frozen
    class Options:
        warmup_epochs: float = option(0.0, doc="epochs of linear warm-up", validator=at_least(0))

    def __init__(self, options: "Constant.Options") -> None:
        self.options = options

    def factor(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        warm = int(round(self.options.warmup_epochs * steps_per_epoch))
        return (step + 1) / warm if step < warm else 1.0


def optimizers() -> Registry:
    registry = Registry("optimizer")
    registry.add(SGD, "contsup")
    return registry


def schedules() -> Registry:
    registry = Registry("schedule")
    registry.add(Cosine, "contsup")
    registry.add(Constant, "contsup")
    return registry


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule, total_steps: int, steps_per_epoch: int):
    """A per-step ``LambdaLR`` following ``schedule.factor``."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule.factor(step, total_steps, steps_per_epoch)
    )

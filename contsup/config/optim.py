"""Optimizers and learning-rate schedules: part of the engine, chosen by name in a recipe."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable

import attrs

from contsup.options import MAX_EPOCHS, at_least, between, greater_than, in_range, option
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
        # foreach: the multi-tensor update, also on CPU (torch picks it only on CUDA); the same
        # elementwise arithmetic as the per-tensor loop, bit for bit, in fewer kernel calls
        return torch.optim.SGD(
            list(params), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay, foreach=True
        )


class AdamW:
    """Adam with decoupled weight decay (Loshchilov and Hutter): what vision transformers are
    trained with (DeiT: lr 5e-4 x batch / 512, weight decay 0.05)."""

    name = "adamw"

    @attrs.frozen
    class Options:
        lr: float = option(1e-3, doc="initial learning rate (after warm-up)", validator=greater_than(0))
        beta1: float = option(0.9, doc="decay of the gradient's running mean", validator=in_range(0.0, 1.0, high_open=True))
        beta2: float = option(0.999, doc="decay of the squared gradient's running mean", validator=in_range(0.0, 1.0, high_open=True))
        eps: float = option(1e-8, doc="added to the denominator", validator=greater_than(0))
        weight_decay: float = option(0.05, doc="decoupled weight decay (a fraction of lr x the weight, every step)", validator=at_least(0.0))

    def __init__(self, options: "AdamW.Options") -> None:
        self.options = options

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        import torch

        o = self.options
        return torch.optim.AdamW(list(params), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)


class Cosine:
    """Linear warm-up from 0, then cosine decay to ``final_ratio`` x lr, stepped every batch."""

    name = "cosine"

    @attrs.frozen
    class Options:
        warmup_epochs: float = option(0.0, doc="epochs of linear warm-up before the cosine decay", validator=between(0, MAX_EPOCHS))
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


class OfficialCosine:
    """The official code's schedule, set once per epoch: a cosine over all the epochs,
    ``cos_e = lr/2 (1 + cos(pi e / E))`` for 1-based epoch e of E, blended during the first W
    warm-up epochs from ``start_lr`` into it: ``lr_e = cos_e (e - 1)/W + start_lr (W + 1 - e)/W``.
    Epoch 1 trains at ``start_lr``, epoch W+1 on is the plain cosine, the last epoch at 0."""

    name = "official_cosine"
    needs_base_lr = True  # lr_scheduler passes the optimizer's lr: start_lr is absolute, not a fraction

    @attrs.frozen
    class Options:
        warmup_epochs: int = option(10, doc="epochs blended from start_lr into the cosine", validator=between(0, MAX_EPOCHS))
        start_lr: float = option(0.01, doc="learning rate of the first epoch (absolute, whatever optimizer.lr is)", validator=at_least(0.0))

    def __init__(self, options: "OfficialCosine.Options") -> None:
        self.options = options

    def lr(self, epoch: int, epochs: int, base_lr: float) -> float:
        """The learning rate of 1-based ``epoch`` of ``epochs``."""
        cosine = 0.5 * base_lr * (1 + math.cos(math.pi * epoch / epochs))
        w = self.options.warmup_epochs
        if epoch <= w:
            return cosine * (epoch - 1) / w + self.options.start_lr * (w + 1 - epoch) / w
        return cosine

    def factor(self, step: int, total_steps: int, steps_per_epoch: int, base_lr: float = 1.0) -> float:
        """The lr multiplier at 0-based ``step``: constant within an epoch."""
        epochs = max(1, round(total_steps / max(1, steps_per_epoch)))
        epoch = min(epochs, step // max(1, steps_per_epoch) + 1)
        return self.lr(epoch, epochs, base_lr) / base_lr


class Constant:
    """Linear warm-up, then a constant learning rate."""

    name = "constant"

    @attrs.frozen
    class Options:
        warmup_epochs: float = option(0.0, doc="epochs of linear warm-up", validator=between(0, MAX_EPOCHS))

    def __init__(self, options: "Constant.Options") -> None:
        self.options = options

    def factor(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        warm = int(round(self.options.warmup_epochs * steps_per_epoch))
        return (step + 1) / warm if step < warm else 1.0


def optimizers() -> Registry:
    registry = Registry("optimizer")
    registry.add(SGD, "contsup")
    registry.add(AdamW, "contsup")
    return registry


def schedules() -> Registry:
    registry = Registry("schedule")
    registry.add(Cosine, "contsup")
    registry.add(Constant, "contsup")
    registry.add(OfficialCosine, "contsup")
    return registry


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule, total_steps: int, steps_per_epoch: int):
    """A per-step ``LambdaLR`` following ``schedule.factor`` (given the group's lr as ``base_lr``
    when the schedule says ``needs_base_lr``, for schedules with an absolute learning rate)."""
    import torch

    if getattr(schedule, "needs_base_lr", False):
        lambdas = [
            (lambda step, base=group["lr"]: schedule.factor(step, total_steps, steps_per_epoch, base_lr=base))
            for group in optimizer.param_groups
        ]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule.factor(step, total_steps, steps_per_epoch)
    )

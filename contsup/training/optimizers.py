"""One module's training state as one object: its optimizer, learning-rate schedule, gradient
scaler and gradient sync (:class:`ModuleOptimizer`). Greedy training has one per module, end to
end and activation checkpointing one for the whole network; checkpoints store their states as
three lists (optimizers, schedulers, scalers) in module order."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

from contsup.config.optim import lr_scheduler
from contsup.training.precision import Precision

SyncGradients = Callable[[torch.optim.Optimizer], None]  # sums an optimizer's gradients over ranks
STATE_KEYS = ("optimizers", "schedulers", "scalers")  # a checkpoint's lists, one entry per ModuleOptimizer


def no_sync(_optimizer: torch.optim.Optimizer) -> None:
    """One process: the gradients are already those of the whole batch."""


class ModuleOptimizer:
    """What updates one module: ``backward`` (weighted, through the gradient scaler) accumulates
    gradients, ``step`` sums them over the processes sharing the batch, steps the optimizer and
    the scaler, then the schedule. ``optimizer`` and ``schedule`` are the recipe's components."""

    def __init__(
        self, params: Iterable[torch.nn.Parameter], optimizer: Any, schedule: Any, total_steps: int, steps_per_epoch: int,
        precision: Precision | None = None, sync: SyncGradients = no_sync,
    ) -> None:
        self.optimizer: torch.optim.Optimizer = optimizer.build(params)
        self.scheduler = lr_scheduler(self.optimizer, schedule, total_steps, steps_per_epoch)
        self.scaler = (precision or Precision()).scaler()
        self.sync = sync

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(
        self, loss: torch.Tensor, weight: float = 1.0, retain_graph: bool = False, inputs: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """Back-propagate ``loss`` x ``weight`` (this process's share of a batch split over several),
        into ``inputs`` only when given."""
        loss = loss if weight == 1.0 else loss * weight
        self.scaler.scale(loss).backward(retain_graph=retain_graph, inputs=inputs)

    def step(self) -> None:
        """One update on the gathered gradients: sync, optimizer (through the scaler), schedule."""
        self.sync(self.optimizer)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def states(trainers: Sequence[ModuleOptimizer]) -> dict[str, list]:
    """What a checkpoint stores of ``trainers``: three lists, in module order."""
    per_module = [t.state_dict() for t in trainers]
    return {key: [s[key[:-1]] for s in per_module] for key in STATE_KEYS}


def load_states(trainers: Sequence[ModuleOptimizer], saved: dict[str, list]) -> None:
    """Restore what :func:`states` stored; a list of another length is a ValueError naming it."""
    for key in STATE_KEYS:
        if len(saved[key]) != len(trainers):
            raise ValueError(f"it has {len(saved[key])} {key[:-1].replace('scaler', 'grad scaler')}s, this recipe has {len(trainers)}")
    for i, t in enumerate(trainers):
        t.load_state_dict({key[:-1]: saved[key][i] for key in STATE_KEYS})


__all__ = ["ModuleOptimizer", "SyncGradients", "no_sync", "states", "load_states", "STATE_KEYS"]

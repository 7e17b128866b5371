"""The saved-tensor bytes a real training step keeps alive for each backward pass.

:meth:`contsup.model.memory.CostModel.plan_costs` predicts these figures from pieces measured
alone; :func:`measure_step` counts them during one greedy (or end-to-end) step of the training
loop's own strategy, which is how ``tests/test_memory.py`` pins the prediction to the byte and how
``contsup bench`` reports the memory of both modes.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from contsup.model.memory import SavedStorages, module_tensors, storage_bytes, storage_key
from contsup.training.strategies import StepStats


class StepMemory:
    """Records, at the start of every backward pass, the bytes alive for it: the unique storages
    saved since the previous backward plus the context tensors the store holds (x excluded: the
    batch is held in every strategy and counts when something saves it)."""

    def __init__(self, exclude: Iterable[torch.Tensor], x: torch.Tensor) -> None:
        self.recorder = SavedStorages(exclude)
        self.x_key = storage_key(x)
        self.stores: list[Any] = []
        self.per_backward: list[int] = []
        self._in_backward = False

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if self._in_backward:
            self._in_backward = False
            self.recorder.clear()
        return self.recorder._pack(t)

    def _unpack(self, t: torch.Tensor) -> torch.Tensor:
        if not self._in_backward:
            self._in_backward = True
            self.per_backward.append(self._alive())
        return t

    def _alive(self) -> int:
        total = self.recorder.total()
        seen = self.recorder.keys() | {self.x_key}
        for store in self.stores:
            for t in getattr(store, "kept", {}).values():
                key = storage_key(t)
                if key is not None and key not in seen:
                    seen.add(key)
                    total += storage_bytes(t)
        return total


def measure_step(strategy: Any, x: torch.Tensor, y: torch.Tensor) -> list[int]:
    """Run one training step of ``strategy`` (greedy or end-to-end) and return, per backward
    pass, the saved-tensor bytes alive for it (greedy: one entry per module)."""
    network = strategy.network
    memory = StepMemory(module_tensors(network), x)
    make_store = network.store

    def store(x: torch.Tensor, detach: bool) -> Any:
        s = make_store(x, detach)
        memory.stores[:] = [s]
        return s

    network.store = store  # instance attribute, removed below: the class's method is untouched
    try:
        with torch.autograd.graph.saved_tensors_hooks(memory._pack, memory._unpack):
            strategy.step(x, y, StepStats(network.num_modules), lambda module, loss: None)
    finally:
        del network.store
        memory.recorder.clear()
        memory.stores.clear()
    return memory.per_backward


__all__ = ["StepMemory", "measure_step"]

"""The saved-tensor bytes a real training step keeps alive for each backward pass.

:meth:`contsup.model.memory.CostModel.plan_costs` predicts these figures from pieces measured
alone; :func:`measure_step` counts them during one greedy (or end-to-end) step of the training
loop's own strategy, which is how ``tests/test_memory.py`` pins the prediction to the byte and how
``contsup bench`` reports the memory of both modes. :func:`measure_live` follows the saved
storages over the whole step instead, backward included, so that a strategy that recomputes
(activation checkpointing) is charged for what it recomputes. :func:`measure_flops` counts the
arithmetic of one step the same way, on a copy of the strategy.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from typing import Any, Iterable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

from contsup.model.saved import SavedStorages, module_tensors, storage_bytes, storage_key
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

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if self._in_backward:
            self._in_backward = False
            self.recorder.clear()
        return self.recorder.pack(t)

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
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

    def watch(store: Any) -> None:
        memory.stores[:] = [store]

    network.store_watchers.append(watch)
    try:
        with torch.autograd.graph.saved_tensors_hooks(memory.pack, memory.unpack):
            strategy.step(x, y, StepStats(network.num_modules), lambda module, loss: None)
    finally:
        network.store_watchers.remove(watch)
        memory.recorder.clear()
        memory.stores.clear()
    return memory.per_backward


class _Held:
    """One saved reference to a storage the meter counts; dropping it (the graph let go of the
    saved tensor) releases the reference."""

    __slots__ = ("meter", "key", "__weakref__")

    def __init__(self, meter: "LiveMemory", key: Any) -> None:
        self.meter, self.key = meter, key

    def __del__(self) -> None:
        self.meter._release(self.key)


class LiveMemory:
    """The saved-tensor bytes alive over a whole step, forward and backward: a storage counts from
    the moment autograd saves it until the graph drops the last saved reference to it (after the
    backward that used it), so the peak includes what recomputation (activation checkpointing)
    saves during backward. Parameters and buffers are left out, as everywhere.

    Plain end-to-end frees nothing before its backward starts: its peak equals
    :class:`StepMemory`'s figure. A strategy that recomputes runs its segments under
    :meth:`recomputation` (see ``strategy.recompute_scope``, and a module's when its adapters or
    head recompute), which counts the recomputed tensors checkpointing keeps for its backward.
    """

    def __init__(self, exclude: Iterable[torch.Tensor]) -> None:
        self.exclude = {k for k in (storage_key(t) for t in exclude) if k is not None}
        self.live: dict[Any, list[int]] = {}  # key -> [bytes, references]
        self.current = 0
        self.peak = 0
        self.peak_forward = 0
        self.peak_backward = 0

    def hold(self, t: torch.Tensor) -> _Held | None:
        """Count ``t``'s storage as alive until the returned object is dropped (None: not counted)."""
        key = storage_key(t)
        if key is None or key in self.exclude:
            return None
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [storage_bytes(t), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
            if torch._C._current_graph_task_id() == -1:
                self.peak_forward = max(self.peak_forward, self.current)
            else:
                self.peak_backward = max(self.peak_backward, self.current)
        entry[1] += 1
        return _Held(self, key)

    def _release(self, key: Any) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            self.current -= entry[0]
            del self.live[key]

    def pack(self, t: torch.Tensor) -> tuple[torch.Tensor, _Held | None]:
        # a detached alias (same storage): holding ``t`` itself, a saved output would reference
        # its own graph node, a cycle that only a backward without retain_graph breaks, so a
        # retained graph (a training method's link) that no later backward walks, such as module l's head,
        # would stay alive, and be counted, to the end of the step
        return t.detach(), self.hold(t)

    @staticmethod
    def unpack(packed: tuple[torch.Tensor, Any]) -> torch.Tensor:
        return packed[0]

    @contextlib.contextmanager
    def recomputation(self) -> Iterator[None]:
        """Around a checkpointed segment's function: during backward's recomputation, count each
        tensor checkpointing keeps (until its backward unpacks it); in the forward, nothing (the
        checkpoint keeps only the segment's inputs, which the outer hooks count)."""
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if top is None or torch._C._current_graph_task_id() == -1:
            yield
            return
        inner_pack, inner_unpack = top

        def pack(t: torch.Tensor) -> Any:
            kept = t.detach() if t.requires_grad else t  # what checkpointing stores, and drops
            held = self.hold(kept)
            if held is not None:
                weakref.finalize(kept, lambda h=[held]: h.clear())
            del held
            return inner_pack(kept)

        with torch.autograd.graph.saved_tensors_hooks(pack, inner_unpack):
            yield


def measure_live(strategy: Any, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
    """Run one training step of ``strategy`` and return the peak saved-tensor bytes alive at any
    moment of it (``peak``), in its forward passes (``forward``) and in its backward passes
    (``backward``), recomputation included."""
    network = strategy.network
    meter = LiveMemory(module_tensors(network))
    # what recomputes: a checkpointing strategy's segments, the modules' adapters and heads
    scoped = [o for o in (strategy, *network.blocks) if hasattr(o, "recompute_scope")]
    for o in scoped:
        o.recompute_scope = meter.recomputation
    try:
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            strategy.step(x, y, StepStats(network.num_modules), lambda module, loss: None)
    finally:
        for o in scoped:
            o.recompute_scope = contextlib.nullcontext
    return {"peak": meter.peak, "forward": meter.peak_forward, "backward": meter.peak_backward}


class _GlobalCount:
    """``FlopCounterMode``'s module tracker without its module hooks: every count goes to the
    global total, which is all the bench reads. The tracker's backward hooks on module inputs
    break a custom autograd Function that calls ``torch.autograd.grad`` in its backward (the
    heads of ``context.recompute_head``): torch refuses a leaf of that inner call."""

    parents = ("Global",)

    def __enter__(self) -> "_GlobalCount":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def measure_flops(strategy: Any, x: torch.Tensor, y: torch.Tensor) -> int:
    """The floating-point operations of one training step of ``strategy`` on x: (B, C, H, W),
    y: (B,): forward, backward and what backward recomputes, as ``FlopCounterMode`` counts them
    (matrix products and convolutions; elementwise work, the optimizer's included, counts 0).
    The step runs on a deep copy, so the strategy's weights, optimizer and schedule stay as they were."""
    twin = copy.deepcopy(strategy)
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalCount()
    with counter:
        twin.step(x, y, StepStats(twin.network.num_modules), lambda module, loss: None)
    return int(counter.get_total_flops())


__all__ = ["StepMemory", "measure_step", "LiveMemory", "measure_live", "measure_flops"]

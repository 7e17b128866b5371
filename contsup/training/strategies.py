"""How a network learns from one batch: greedily (each module on its own local loss, one
optimizer and schedule per module) or end to end (one loss at the end, one optimizer).

:class:`CheckpointStrategy` is end to end under activation checkpointing, the memory baseline
``contsup bench`` measures greedy training against.

A greedy step, per batch and module by module: h^c from detached context, forward, local loss,
backward, optimizer step, pass ``h.detach()`` on. Only one module's graph is alive at a time.

A training method (:class:`contsup.protocols.Method`, docs/plugins/methods.md) may link a
module to the next: module l's last units keep their graph until module l+1's backward has
reached them, and module l steps only then, on the sum of both losses' gradients; nothing before
those units is reached by module l+1's loss.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import attrs
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from contsup.errors import ContsupError
from contsup.model.components import training_method
from contsup.model.network import ContextModule, ContextStore, GreedyNetwork
from contsup.partition import even_split
from contsup.training.evaluation import EvalCounts, evaluation_counts
from contsup.training.optimizers import ModuleOptimizer, SyncGradients, load_states, no_sync, states
from contsup.training.precision import Precision

if TYPE_CHECKING:
    from contsup.config.recipe import Recipe

Check = Callable[[int, torch.Tensor], None]  # (module, loss): raises when the loss is unusable


@attrs.define
class StepStats:
    """Per-module sums over an epoch: loss x batch, correct predictions, samples."""

    modules: int
    loss: list[float] = attrs.field(init=False)
    correct: list[int | None] = attrs.field(init=False)
    seen: list[int] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.loss = [0.0] * self.modules
        self.correct = [0] * self.modules
        self.seen = [0] * self.modules

    def add(self, module: int, loss: float, prediction: torch.Tensor | None, y: torch.Tensor) -> None:
        i = module - 1
        self.loss[i] += loss * len(y)
        self.seen[i] += len(y)
        if prediction is None or self.correct[i] is None:
            self.correct[i] = None
        else:
            self.correct[i] += int((prediction == y).sum())

    def mean_loss(self) -> list[float | None]:
        return [module / n if n else None for module, n in zip(self.loss, self.seen)]

    def accuracy(self) -> list[float | None]:
        return [100.0 * c / n if n and c is not None else None for c, n in zip(self.correct, self.seen)]

    def as_tensor(self, modules: Any = None) -> torch.Tensor:
        """[loss sums | correct | seen | 1 where a head does not classify], float64: (4, K), with
        only the entries of ``modules`` (1-based indices; default all): summed over processes,
        each module counted once."""
        t = torch.zeros(4, self.modules, dtype=torch.float64)
        for i in (m - 1 for m in (modules or range(1, self.modules + 1))):
            t[0, i], t[1, i], t[2, i] = self.loss[i], self.correct[i] or 0, self.seen[i]
            t[3, i] = 1.0 if self.correct[i] is None else 0.0
        return t

    @classmethod
    def from_tensor(cls, t: torch.Tensor, k: int) -> "StepStats":
        loss, correct, seen, missing = t.cpu().view(4, k).tolist()
        out = cls(k)
        out.loss = loss
        out.correct = [None if m > 0 else int(round(c)) for c, m in zip(correct, missing)]
        out.seen = [int(round(s)) for s in seen]
        return out


class Strategy(Protocol):
    """What the training loop asks of a way of learning: a step on a batch, this process's test
    counts, and the state a checkpoint keeps."""

    network: GreedyNetwork
    modules: tuple[int, ...]  # the (1-based) modules this process trains: all, but in a pipeline
    active_module: int | None  # the module being trained, for error messages (None: the whole network)

    def step(self, x: torch.Tensor | None, y: torch.Tensor | None, stats: StepStats, check: Check, weight: float = 1.0) -> None:
        """One optimizer step on a batch x: (B, C, H, W), y: (B,); the loss is scaled by ``weight``
        (this process's share of a batch split over several)."""

    def evaluate(self, loader: Any, device: torch.device, precision: Precision, channels_last: bool) -> EvalCounts:
        """This process's test counts, the heads of :attr:`modules` in eval mode."""

    def state(self) -> dict[str, Any]:
        """``model`` (the whole network's state dict) and the optimizers', schedulers' and grad
        scalers' states in module order, as checkpoints keep them."""

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from what :meth:`state` gave."""

    def lr(self) -> float:
        """The current learning rate (of the first module's optimizer)."""


class Updates:
    """The :class:`ModuleOptimizer` s of a strategy and their parts, read as lists (``optimizers``,
    ``schedulers``, ``scalers``), and the state every local strategy keeps."""

    network: GreedyNetwork
    updates: list[ModuleOptimizer]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [u.optimizer for u in self.updates]

    @property
    def schedulers(self) -> list[Any]:
        return [u.scheduler for u in self.updates]

    @property
    def scalers(self) -> list[Any]:
        return [u.scaler for u in self.updates]

    def lr(self) -> float:
        return self.updates[0].lr

    def evaluate(self, loader: Any, device: torch.device, precision: Precision, channels_last: bool) -> EvalCounts:
        return evaluation_counts(self.network, loader, device, precision, channels_last)

    def state(self) -> dict[str, Any]:
        return {"model": self.network.state_dict(), **states(self.updates)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["model"])
        load_states(self.updates, state)


class GreedyStrategy(Updates):
    """Trains every module on its own local loss, with one optimizer and schedule per module.

    ``precision`` (default fp32) adds autocast and one grad scaler per module; ``sync`` sums a
    module's gradients over the processes that share its batch, just before its optimizer steps.
    ``method``: a training method (:class:`contsup.protocols.Method`) the step serves through its
    hooks: its parts' loss terms, a link into the previous module, a hook after each step."""

    def __init__(
        self, network: GreedyNetwork, optimizer: Any, schedule: Any, total_steps: int, steps_per_epoch: int,
        precision: Precision | None = None, sync: SyncGradients = no_sync, method: Any = None,
    ) -> None:
        self.network = network
        self.modules = tuple(range(1, network.num_modules + 1))
        self.method = method
        self.precision = precision or Precision()
        self.updates = [
            ModuleOptimizer(trainable(m), optimizer, schedule, total_steps, steps_per_epoch, self.precision, sync)
            for m in network.blocks
        ]
        link = getattr(method, "link", None)
        k = network.num_modules
        self.links = [int(link(m.index, k, len(m.body))) if link is not None else 0 for m in network.blocks]
        self.active_module: int | None = None
        self.pending: int | None = None  # a module whose step waits for the next module's backward (0-based)

    def step(self, x: torch.Tensor, y: torch.Tensor, stats: StepStats, check: Check, weight: float = 1.0) -> None:
        """One greedy step on a batch x: (B, C, H, W), y: (B,): module by module."""
        store = self.network.store(x, detach=True)
        h, self.pending = x, None
        for m in self.network.blocks:
            h = self.train_module(m, h, store, x, y, stats, check, weight)
        self.active_module = None

    def train_module(
        self, m: ContextModule, h: torch.Tensor, store: ContextStore, x: torch.Tensor | None, y: torch.Tensor,
        stats: StepStats, check: Check, weight: float = 1.0, begin: bool = True, finish: bool = True,
    ) -> torch.Tensor:
        """Module ``m``'s part of a greedy step: h^c from detached context, forward, local loss,
        backward and (when ``finish``) its own optimizer and schedule step. Returns its output for
        the next module: detached, or, where the method links module ``m`` to the next one, with
        the graph of its last units (their input detached), and its step waits for that backward.
        ``begin``, ``finish`` and ``weight`` let micro-batches accumulate gradients into one step
        (the pipeline uses them)."""
        i = m.index - 1
        update, span, pending = self.updates[i], self.links[i], self.pending
        self.active_module = m.index
        if pending is not None and update.scaler.is_enabled():  # module l's grads in module l's loss scale
            ratio = float(self.updates[pending].scaler.get_scale()) / float(update.scaler.get_scale())
            h.register_hook(lambda g, r=ratio: g * r)
        with self.precision.autocast():
            hc = store.context_input(m, h)
            if span:
                prefix, suffix = split_body(m, span)
                p = prefix(hc)
                p_in = p.detach().requires_grad_(True)
                out = suffix(p_in)
            else:
                p = p_in = None
                out = m.body(hc)
            result = m.loss(out, y, x)
        check(m.index, result.total)
        linked, own = self._terms(m, result)
        if begin:
            update.zero_grad()
        keep = bool(span) or own is not None  # the last units' graph waits for the next module
        if linked is not None:
            update.backward(linked, weight, retain_graph=keep)
        if p is not None and p.requires_grad and p_in.grad is not None:  # the prefix, adapters and the previous span
            p.backward(p_in.grad, retain_graph=own is not None)
        if own is not None:
            self._own_backward(m, own, weight, p, p_in, retain=bool(span))
        if pending is not None:
            self._optimizer_step(pending)
        stats.add(m.index, float(result.local), result.prediction, y)
        store.release(m.index)
        del result
        if span:
            self.pending = i
            return out
        self.pending = None
        if finish:
            self._optimizer_step(i)
        return out.detach()

    def _terms(self, m: ContextModule, result: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(linked, own): the module's loss as the method splits it (all linked without one)."""
        terms = getattr(self.method, "terms", None)
        if terms is None:
            return result.total, None
        return terms(m.index, self.network.num_modules, result.total, result.extra)

    def _own_backward(self, m: ContextModule, own: torch.Tensor, weight: float, p: Any, p_in: Any, retain: bool) -> None:
        """The term that stays in module ``m``: its gradients reach m's own parameters only."""
        params = trainable(m)
        update = self.updates[m.index - 1]
        if p_in is None:
            update.backward(own, weight, inputs=params)
            return
        p_in.grad = None  # the linked term's share went back already
        update.backward(own, weight, retain_graph=retain, inputs=[*params, p_in])
        if p.requires_grad and p_in.grad is not None:  # on through the prefix and adapters, not the previous module
            torch.autograd.backward(p, p_in.grad, inputs=params)

    def _optimizer_step(self, i: int) -> None:
        """Module i+1's optimizer and schedule step, then the method's hook after it."""
        self.updates[i].step()
        after = getattr(self.method, "after_step", None)
        if after is not None:
            after(self.network.blocks[i], self.network)


def trainable(m: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``m`` an optimizer updates: those that require grad (a method's frozen
    copy does not)."""
    return [q for q in m.parameters() if q.requires_grad]


def split_body(m: ContextModule, units: int) -> tuple[nn.Module, nn.Module]:
    """Module ``m``'s body as (prefix, suffix), the suffix its last ``units`` units (all of them
    when it has fewer)."""
    if not isinstance(m.body, nn.Sequential):
        raise ContsupError(
            f"module {m.index}'s body is a {type(m.body).__name__}, not a sequence of units; the training "
            f"method links the next module's loss into its last units and needs one"
        )
    n = len(m.body)
    cut = max(0, n - units)
    return m.body[:cut], m.body[cut:]


def e2e_parameters(network: GreedyNetwork) -> list[nn.Parameter]:
    """What end-to-end training updates: every module's adapters and body, and the final head."""
    params: list[nn.Parameter] = []
    for m in network.blocks:
        params += list(m.adapters.parameters()) + list(m.body.parameters())
    params += list(network.blocks[-1].head.parameters())
    return params


class EndToEndStrategy(Updates):
    """Back-propagates the final cross-entropy through the whole network (adapters included)."""

    def __init__(
        self, network: GreedyNetwork, optimizer: Any, schedule: Any, total_steps: int, steps_per_epoch: int,
        precision: Precision | None = None, sync: SyncGradients = no_sync,
    ) -> None:
        self.network = network
        self.modules = tuple(range(1, network.num_modules + 1))
        self.precision = precision or Precision()
        self.updates = [
            ModuleOptimizer(e2e_parameters(network), optimizer, schedule, total_steps, steps_per_epoch, self.precision, sync)
        ]
        self.active_module: int | None = None  # the whole network trains at once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The last module's output h_K for x: (B, C, H, W), through every module."""
        return self.network.module_outputs(x)[-1]

    def step(self, x: torch.Tensor, y: torch.Tensor, stats: StepStats, check: Check, weight: float = 1.0) -> None:
        last = self.network.blocks[-1]
        with self.precision.autocast():
            out = self.forward(x)
            result = last.loss(out, y, x)
        check(last.index, result.total)
        update = self.updates[0]
        update.zero_grad()
        update.backward(result.total, weight)
        update.step()
        stats.add(last.index, float(result.local), result.prediction, y)


def segment_sizes(units: int, segments: int) -> list[int]:
    """``units`` split into ``segments`` contiguous groups, as equal as possible (larger first)."""
    return list(even_split(units, segments, larger_first=True))


class CheckpointStrategy(EndToEndStrategy):
    """End to end under activation checkpointing: the units of a network without context (the
    plain backbone) run in ``segments`` contiguous groups, each through
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the forward keeps only each
    group's input and backward recomputes one group at a time. The same gradients as
    :class:`EndToEndStrategy`, less memory, more time; what a user who only wants memory would
    pick instead of greedy training. ``recompute_scope`` wraps every group's function (the live
    meter of ``training/measure.py`` counts the recomputed tensors through it)."""

    def __init__(
        self, network: GreedyNetwork, optimizer: Any, schedule: Any, total_steps: int, steps_per_epoch: int,
        segments: int, precision: Precision | None = None, sync: SyncGradients = no_sync,
    ) -> None:
        super().__init__(network, optimizer, schedule, total_steps, steps_per_epoch, precision=precision, sync=sync)
        if any(m.sources for m in network.blocks):
            raise ValueError("checkpointing runs a network without context adapters (the plain backbone)")
        self.units: list[nn.Module] = [u for m in network.blocks for u in m.body]
        self.sizes = segment_sizes(len(self.units), segments)
        self.recompute_scope: Callable[[], Any] = contextlib.nullcontext

    def _segment(self, units: Sequence[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(h: torch.Tensor) -> torch.Tensor:
            with self.recompute_scope():
                for u in units:
                    h = u(h)
            return h

        return run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h_K for x, one checkpointed group of units after another."""
        h, first = x, 0
        for size in self.sizes:
            h = checkpoint(self._segment(self.units[first : first + size]), h, use_reentrant=False)
            first += size
        return h


STRATEGIES = {"greedy": GreedyStrategy, "e2e": EndToEndStrategy}


def make_strategy(
    recipe: Recipe, network: GreedyNetwork, steps_per_epoch: int, precision: Precision, sync: SyncGradients = no_sync
) -> Strategy:
    """The recipe's strategy (``run.mode``), with its optimizer(s) and schedule(s) over the run."""
    extra = {"method": training_method(recipe)} if recipe.run.mode == "greedy" else {}
    return STRATEGIES[recipe.run.mode](
        network, recipe.optimizer.create(), recipe.schedule.create(), steps_per_epoch * recipe.run.epochs,
        steps_per_epoch, precision=precision, sync=sync, **extra,
    )


__all__ = [
    "StepStats", "Strategy", "Updates", "GreedyStrategy", "EndToEndStrategy", "CheckpointStrategy", "segment_sizes", "STRATEGIES",
    "make_strategy", "e2e_parameters", "split_body",
]

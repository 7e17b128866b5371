"""The training loop: greedy (one local loss per module) or end-to-end, then evaluation.

A greedy step, per batch and module by module: build h^c from detached context, forward,
local loss, backward, optimizer step, pass ``h.detach()`` on. Only one module's graph is alive
at a time. Nothing here knows a concrete model, loss or dataset: those are plugins.
"""

from __future__ import annotations

import random
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import attrs
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from contsup.errors import ContsupError
from contsup.network import Built, GreedyNetwork, build_network
from contsup.optim import lr_scheduler
from contsup.progress import Progress


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; an unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ContsupError(f"run.device: '{name}' was asked for but CUDA is not available here; use \"auto\" or \"cpu\"")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ContsupError("run.device: 'mps' was asked for but is not available here; use \"auto\" or \"cpu\"")
    return torch.device(name)


def make_loaders(recipe: Any, dataset: Any, device: torch.device) -> tuple[DataLoader, DataLoader]:
    """Seeded, shuffled training loader and ordered test loader."""
    d = recipe.data
    generator = torch.Generator().manual_seed(recipe.run.seed)
    pin = device.type == "cuda"
    train = DataLoader(
        dataset.load(train=True), batch_size=d.batch_size, shuffle=True, generator=generator,
        num_workers=d.workers, pin_memory=pin, drop_last=False, persistent_workers=d.workers > 0,
    )
    test = DataLoader(
        dataset.load(train=False), batch_size=d.test_batch_size or d.batch_size, shuffle=False,
        num_workers=d.workers, pin_memory=pin,
    )
    return train, test


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
        return [l / n if n else None for l, n in zip(self.loss, self.seen)]

    def accuracy(self) -> list[float | None]:
        return [100.0 * c / n if n and c is not None else None for c, n in zip(self.correct, self.seen)]


class GreedyStrategy:
    """Trains every module on its own local loss, with one optimizer and schedule per module."""

    def __init__(self, network: GreedyNetwork, optimizer: Any, schedule: Any, total_steps: int, steps_per_epoch: int) -> None:
        self.network = network
        self.optimizers = [optimizer.build(m.parameters()) for m in network.blocks]
        self.schedulers = [lr_scheduler(o, schedule, total_steps, steps_per_epoch) for o in self.optimizers]

    def step(self, x: torch.Tensor, y: torch.Tensor, stats: StepStats, check: Callable[[int, torch.Tensor], None]) -> None:
        store = self.network.store(x, detach=True)
        h = x
        for m, opt, sched in zip(self.network.blocks, self.optimizers, self.schedulers):
            hc = m.enrich(h, store.gather(m.sources))
            store.add(m.index - 1, hc)
            out = m.body(hc)
            result = m.loss(out, y, x)
            check(m.index, result.total)
            opt.zero_grad(set_to_none=True)
            result.total.backward()
            opt.step()
            sched.step()
            stats.add(m.index, float(result.local), result.prediction, y)
            h = out.detach()
            store.release(m.index)

    def lr(self) -> float:
        return self.optimizers[0].param_groups[0]["lr"]


def e2e_parameters(network: GreedyNetwork) -> list[nn.Parameter]:
    """What end-to-end training updates: every module's adapters and body, and the final head."""
    params: list[nn.Parameter] = []
    for m in network.blocks:
        params += list(m.adapters.parameters()) + list(m.body.parameters())
    params += list(network.blocks[-1].head.parameters())
    return params


class EndToEndStrategy:
    """Back-propagates the final cross-entropy through the whole network (adapters included)."""

    def __init__(self, network: GreedyNetwork, optimizer: Any, schedule: Any, total_steps: int, steps_per_epoch: int) -> None:
        self.network = network
        self.optimizers = [optimizer.build(e2e_parameters(network))]
        self.schedulers = [lr_scheduler(self.optimizers[0], schedule, total_steps, steps_per_epoch)]

    def step(self, x: torch.Tensor, y: torch.Tensor, stats: StepStats, check: Callable[[int, torch.Tensor], None]) -> None:
        last = self.network.blocks[-1]
        out = self.network.module_outputs(x)[-1]
        result = last.loss(out, y, x)
        check(last.index, result.total)
        opt = self.optimizers[0]
        opt.zero_grad(set_to_none=True)
        result.total.backward()
        opt.step()
        self.schedulers[0].step()
        stats.add(last.index, float(result.local), result.prediction, y)

    def lr(self) -> float:
        return self.optimizers[0].param_groups[0]["lr"]


STRATEGIES = {"greedy": GreedyStrategy, "e2e": EndToEndStrategy}


@attrs.frozen
class Evaluation:
    """Test error of the final output and accuracy of every module's head, in percent."""

    error_pct: float
    loss: float
    local_acc_pct: list[float | None]


@torch.no_grad()
def evaluate(network: GreedyNetwork, loader: DataLoader, device: torch.device) -> Evaluation:
    """Evaluate in eval mode: final error and each local head's accuracy."""
    was_training = network.training
    network.eval()
    k = network.num_modules
    correct: list[int | None] = [0] * k
    total, loss_sum = 0, 0.0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        outs = network.module_outputs(x)
        for i, (m, h) in enumerate(zip(network.blocks, outs)):
            z = m.head(h)
            if i == k - 1:
                loss_sum += float(m.objective.loss(z, y)) * len(y)
            prediction = m.objective.predict(z)
            if prediction is None or correct[i] is None:
                correct[i] = None
            else:
                correct[i] += int((prediction == y).sum())
        total += len(y)
    network.train(was_training)
    acc = [100.0 * c / total if c is not None and total else None for c in correct]
    return Evaluation(error_pct=100.0 - (acc[-1] or 0.0), loss=loss_sum / max(total, 1), local_acc_pct=acc)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, kind): CUDA max allocated, else the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu_peak_rss"


class NonFiniteLoss(ContsupError):
    """A local loss became NaN or infinite."""


@attrs.define
class RunInfo:
    """What observers receive: the recipe, the run directory and the network being trained."""

    recipe: Any
    run_dir: Path
    network: GreedyNetwork
    plans: list
    device: torch.device
    epoch: int = 0
    step: int = 0


class Trainer:
    """One run of a recipe: builds everything, trains for ``run.epochs``, evaluates every epoch."""

    def __init__(self, recipe: Any, run_dir: Path, hook: Any = None, log: TextIO | None = None) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.hook = hook
        self.log = log or sys.stdout
        self.device = resolve_device(recipe.run.device)
        seed_everything(recipe.run.seed)
        self.built: Built = build_network(recipe)
        self.network = self.built.network.to(self.device)
        self.dataset = recipe.dataset.create()
        self.train_loader, self.test_loader = make_loaders(recipe, self.dataset, self.device)
        self.steps_per_epoch = len(self.train_loader)
        total = self.steps_per_epoch * recipe.run.epochs
        strategy = STRATEGIES[recipe.run.mode]
        self.strategy = strategy(
            self.network, recipe.optimizer.create(), recipe.schedule.create(), total, self.steps_per_epoch
        )
        self.info = RunInfo(recipe, self.run_dir, self.network, self.built.plans, self.device)
        self.history: list[dict] = []

    def _check(self, epoch: int, step: int) -> Callable[[int, torch.Tensor], None]:
        def check(module: int, loss: torch.Tensor) -> None:
            if not torch.isfinite(loss.detach()).all():
                raise NonFiniteLoss(
                    f"the loss of module {module} became {float(loss):.4g} at epoch {epoch}, step {step}; "
                    f"lower optimizer.lr or add schedule.warmup_epochs"
                )

        return check

    def train_epoch(self, epoch: int) -> dict:
        """One epoch of training then evaluation; returns that epoch's metrics."""
        self.network.train()
        stats = StepStats(self.network.num_modules)
        progress = Progress(epoch, self.recipe.run.epochs, self.steps_per_epoch, self.recipe.run.log_every)
        seen, start = 0, time.perf_counter()
        for i, (x, y) in enumerate(self.train_loader, start=1):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            self.strategy.step(x, y, stats, self._check(epoch, i))
            self.info.step += 1
            seen += len(y)
            progress.update(i, stats.mean_loss())
        progress.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        result = evaluate(self.network, self.test_loader, self.device)
        memory, memory_kind = peak_memory(self.device)
        return {
            "epoch": epoch,
            "step": self.info.step,
            "lr": self.strategy.lr(),
            "train_loss": stats.mean_loss(),
            "train_acc_pct": stats.accuracy(),
            "test_error_pct": result.error_pct,
            "test_loss": result.loss,
            "test_local_acc_pct": result.local_acc_pct,
            "images_per_s": seen / elapsed if elapsed > 0 else None,
            "epoch_time_s": elapsed,
            "peak_memory_bytes": memory,
            "memory_kind": memory_kind,
        }

    def fit(self, on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
        """Train every epoch; ``on_epoch`` sees each epoch's metrics (e.g. to write them)."""
        if self.hook is not None:
            self.hook.on_run_start(run=self.info)
        for epoch in range(len(self.history) + 1, self.recipe.run.epochs + 1):
            self.info.epoch = epoch
            metrics = self.train_epoch(epoch)
            self.history.append(metrics)
            if on_epoch is not None:
                on_epoch(metrics)
            self.log.write(summary_line(metrics, self.recipe.run.epochs) + "\n")
            self.log.flush()
            if self.hook is not None:
                self.hook.on_epoch_end(run=self.info, epoch=epoch, metrics=metrics)
        if self.hook is not None:
            self.hook.on_run_end(run=self.info, metrics=self.history[-1] if self.history else None)
        return self.history


def summary_line(m: dict, epochs: int) -> str:
    """One readable line per epoch."""
    local = [f"{a:.1f}" for a in m["test_local_acc_pct"] if a is not None]
    if len(local) > 8:
        local = local[:3] + ["..."] + local[-3:]
    return (
        f"epoch {m['epoch']}/{epochs}: test error {m['test_error_pct']:.2f}% | "
        f"local acc % {' '.join(local)} | {m['images_per_s']:.0f} img/s | {m['epoch_time_s']:.1f}s"
    )


__all__ = ["Trainer", "evaluate", "seed_everything", "resolve_device", "Sequence"]

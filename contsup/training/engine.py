"""The training loop: greedy (one local loss per module) or end-to-end, then evaluation.

A greedy step, per batch and module by module: build h^c from detached context, forward,
local loss, backward, optimizer step, pass ``h.detach()`` on. Only one module's graph is alive
at a time. Nothing here knows a concrete model, loss or dataset: those are plugins.
"""

from __future__ import annotations

import contextlib
import random
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TextIO

import attrs
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from contsup.training.checkpoint import FORMAT as CHECKPOINT_FORMAT
from contsup.training.checkpoint import describe as describe_checkpoint
from contsup.training.checkpoint import rng_state, save_checkpoint, set_rng_state
from contsup.errors import BatchError, ContsupError, one_line, reason
from contsup.model.network import Built, GreedyNetwork, build_network
from contsup.config.optim import lr_scheduler
from contsup.core.version import __version__
from contsup.training.order import SkippingBatchSampler, epoch_batches, ignore_interrupts
from contsup.training.precision import Precision, apply_device_options, check_precision, to_memory_format
from contsup.training.progress import Progress


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


def preflight(recipe: Any) -> None:
    """What a valid recipe can still ask for in vain on this machine (an absent device, fp16 on a
    CPU): found before a run directory is made."""
    check_precision(recipe.run.precision, resolve_device(recipe.run.device))


def batches_problem(recipe: Any, train_size: int) -> ContsupError | None:
    """An epoch must hold at least one training batch (``data.drop_last`` can leave none)."""
    d = recipe.data
    if d.drop_last and train_size < d.batch_size:
        return ContsupError(
            f"{recipe.source}: data.drop_last = true leaves no training batch: the training set has {train_size} "
            f"images, fewer than data.batch_size = {d.batch_size}; lower data.batch_size or set data.drop_last = false"
        )
    return None


def make_loaders(recipe: Any, dataset: Any, device: torch.device) -> tuple[DataLoader, DataLoader]:
    """Seeded, shuffled training loader and ordered test loader.

    The training order comes from the loader's own generator (see :mod:`contsup.training.order`); its
    workers start afresh each epoch, seeded from that generator, so a resumed run replays them.
    """
    d = recipe.data
    generator = torch.Generator().manual_seed(recipe.run.seed)
    pin = device.type == "cuda"
    train_set = dataset.load(train=True)
    problem = batches_problem(recipe, len(train_set))
    if problem is not None:
        raise problem
    train = DataLoader(
        train_set, batch_sampler=SkippingBatchSampler(len(train_set), d.batch_size, generator, d.drop_last), generator=generator,
        num_workers=d.workers, pin_memory=pin, worker_init_fn=ignore_interrupts if d.workers > 0 else None,
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
    """Trains every module on its own local loss, with one optimizer and schedule per module.

    ``precision`` (default fp32) adds autocast and one grad scaler per module; ``active_module``
    names the module being trained, for error messages."""

    def __init__(
        self, network: GreedyNetwork, optimizer: Any, schedule: Any, total_steps: int, steps_per_epoch: int,
        precision: Precision | None = None,
    ) -> None:
        self.network = network
        self.optimizers = [optimizer.build(m.parameters()) for m in network.blocks]
        self.schedulers = [lr_scheduler(o, schedule, total_steps, steps_per_epoch) for o in self.optimizers]
        self.precision = precision or Precision()
        self.scalers = [self.precision.scaler() for _ in self.optimizers]
        self.active_module: int | None = None

    def step(self, x: torch.Tensor, y: torch.Tensor, stats: StepStats, check: Callable[[int, torch.Tensor], None]) -> None:
        """One greedy step on a batch x: (B, C, H, W), y: (B,): module by module."""
        store = self.network.store(x, detach=True)
        h = x
        for m in self.network.blocks:
            h = self.train_module(m, h, store, x, y, stats, check)
        self.active_module = None

    def train_module(
        self, m: Any, h: torch.Tensor, store: Any, x: torch.Tensor | None, y: torch.Tensor, stats: StepStats,
        check: Callable[[int, torch.Tensor], None], weight: float = 1.0, begin: bool = True, finish: bool = True,
    ) -> torch.Tensor:
        """Module ``m``'s part of a greedy step: h^c from detached context, forward, local loss,
        backward and (when ``finish``) its own optimizer and schedule step. Returns its output
        detached, for the next module. ``begin``, ``finish`` and ``weight`` let micro-batches
        accumulate gradients into one step (the pipeline uses them)."""
        i = m.index - 1
        opt, sched, scaler = self.optimizers[i], self.schedulers[i], self.scalers[i]
        self.active_module = m.index
        with self.precision.autocast():
            hc = m.enrich(h, store.gather(m.sources))
            store.add(m.index - 1, hc)
            out = m.body(hc)
            result = m.loss(out, y, x)
        check(m.index, result.total)
        if begin:
            opt.zero_grad(set_to_none=True)
        loss = result.total if weight == 1.0 else result.total * weight
        scaler.scale(loss).backward()
        if finish:
            scaler.step(opt)
            scaler.update()
            sched.step()
        stats.add(m.index, float(result.local), result.prediction, y)
        store.release(m.index)
        return out.detach()

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

    def __init__(
        self, network: GreedyNetwork, optimizer: Any, schedule: Any, total_steps: int, steps_per_epoch: int,
        precision: Precision | None = None,
    ) -> None:
        self.network = network
        self.optimizers = [optimizer.build(e2e_parameters(network))]
        self.schedulers = [lr_scheduler(self.optimizers[0], schedule, total_steps, steps_per_epoch)]
        self.precision = precision or Precision()
        self.scalers = [self.precision.scaler()]
        self.active_module: int | None = None  # the whole network trains at once

    def step(self, x: torch.Tensor, y: torch.Tensor, stats: StepStats, check: Callable[[int, torch.Tensor], None]) -> None:
        last = self.network.blocks[-1]
        with self.precision.autocast():
            out = self.network.module_outputs(x)[-1]
            result = last.loss(out, y, x)
        check(last.index, result.total)
        opt, scaler = self.optimizers[0], self.scalers[0]
        opt.zero_grad(set_to_none=True)
        scaler.scale(result.total).backward()
        scaler.step(opt)
        scaler.update()
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


@attrs.define
class EvalCounts:
    """Sums over test batches: each module head's correct predictions (None when a head does not
    classify), the final output's loss x images, and the images seen."""

    modules: int
    correct: list[int | None] = attrs.field(init=False)
    total: int = 0
    loss_sum: float = 0.0

    def __attrs_post_init__(self) -> None:
        self.correct = [0] * self.modules

    def add(self, module: Any, z: torch.Tensor, y: torch.Tensor) -> None:
        """Count module ``module``'s head output z: (B, classes) against y: (B,); the last module's
        loss is summed too. ``total`` is counted separately (``images``)."""
        i = module.index - 1
        z = z.float()
        if module.index == self.modules:
            self.loss_sum += float(module.objective.loss(z, y)) * len(y)
        prediction = module.objective.predict(z)
        if prediction is None or self.correct[i] is None:
            self.correct[i] = None
        else:
            self.correct[i] += int((prediction == y).sum())

    def images(self, n: int) -> None:
        self.total += n

    def result(self) -> Evaluation:
        total = self.total
        acc = [100.0 * c / total if c is not None and total else None for c in self.correct]
        return Evaluation(error_pct=100.0 - (acc[-1] or 0.0), loss=self.loss_sum / max(total, 1), local_acc_pct=acc)


@torch.no_grad()
def evaluation_counts(
    network: GreedyNetwork, loader: Any, device: torch.device, precision: Precision | None = None,
    channels_last: bool = False,
) -> EvalCounts:
    """Run the network in eval mode over ``loader``: the sums :class:`EvalCounts` holds."""
    was_training = network.training
    network.eval()
    precision = precision or Precision()
    counts = EvalCounts(network.num_modules)
    for x, y in loader:
        x, y = to_memory_format(x.to(device, non_blocking=True), channels_last), y.to(device, non_blocking=True)
        with precision.autocast():
            outs = network.module_outputs(x)
            heads = [m.head(h) for m, h in zip(network.blocks, outs)]
        for m, z in zip(network.blocks, heads):
            counts.add(m, z, y)
        counts.images(len(y))
    network.train(was_training)
    return counts


def evaluate(
    network: GreedyNetwork, loader: DataLoader, device: torch.device, precision: Precision | None = None,
    channels_last: bool = False,
) -> Evaluation:
    """Evaluate in eval mode: final error and each local head's accuracy."""
    return evaluation_counts(network, loader, device, precision, channels_last).result()


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, kind): CUDA max allocated, else the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu_peak_rss"


class TrainingFailed(ContsupError):
    """Training stopped on a problem of the run itself, not of its input: exit status 1."""

    exit_code = 1


class NonFiniteLoss(TrainingFailed):
    """A local loss (or a module's parameters) became NaN or infinite."""


class OutOfMemory(TrainingFailed):
    """The GPU ran out of memory."""


class Interrupted(ContsupError):
    """Stopped on request (Ctrl-C, or SIGTERM from a scheduler: exit status 143); the message says
    which checkpoint to resume from."""

    exit_code = 130
    label = "stopped"


STOP_SIGNALS = {signal.SIGINT: ("Ctrl-C", 130), signal.SIGTERM: ("SIGTERM", 143)}


def stopped(name: str, *lines: str) -> Interrupted:
    """The Interrupted error for a stop asked by ``name`` ("Ctrl-C" or "SIGTERM"), with its exit status."""
    exc = Interrupted(*lines)
    exc.exit_code = dict(STOP_SIGNALS.values()).get(name, Interrupted.exit_code)
    return exc


@contextlib.contextmanager
def stop_signals(handler: Callable[[str], None]) -> Iterator[None]:
    """Route Ctrl-C and SIGTERM (what a cluster scheduler sends before it kills a job) to
    ``handler(name)`` while training, in the main thread; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        signum: signal.signal(signum, lambda _signum, _frame, name=name: handler(name))
        for signum, (name, _code) in STOP_SIGNALS.items()
    }
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)


@attrs.define
class RunInfo:
    """What observers receive: the recipe, the run directory and the network being trained.
    ``epoch`` is the epoch in progress (at ``on_run_start``: the epochs already done, > 0 on resume)."""

    recipe: Any
    run_dir: Path
    network: GreedyNetwork
    plans: list
    device: torch.device
    epoch: int = 0
    step: int = 0


@attrs.define
class EpochProgress:
    """Where one epoch stands: what a mid-epoch checkpoint records and a resumed epoch continues."""

    epoch: int
    start_state: torch.Tensor  # the loader generator's state when the epoch began: fixes its order
    stats: StepStats
    done: int = 0  # batches trained
    images: int = 0
    elapsed_s: float = 0.0  # training time before ``restart_clock``
    _t0: float = 0.0

    def restart_clock(self) -> None:
        self._t0 = time.perf_counter()

    def elapsed(self) -> float:
        return self.elapsed_s + time.perf_counter() - self._t0


class Trainer:
    """One run of a recipe: builds everything, trains for ``run.epochs``, evaluates every epoch.

    With ``checkpoints`` on (the default) it writes a checkpoint into ``run_dir/checkpoints`` at
    the end of every epoch and every ``run.checkpoint_every_steps`` steps; ``load_state`` resumes
    from one exactly. Ctrl-C during ``fit`` stops after the current step with a checkpoint.
    """

    def __init__(
        self, recipe: Any, run_dir: Path, hook: Any = None, log: TextIO | None = None, checkpoints: bool = True
    ) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.hook = hook
        self.log = log or sys.stdout
        self.device = resolve_device(recipe.run.device)
        check_precision(recipe.run.precision, self.device)
        self.precision = Precision(recipe.run.precision, self.device)
        self.channels_last = recipe.run.channels_last
        apply_device_options(recipe.run.deterministic, self.device)
        seed_everything(recipe.run.seed)
        self.built: Built = build_network(recipe)
        self.network = self.built.network.to(self.device)
        if self.channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)
        self.dataset = recipe.dataset.create()
        self.train_loader, self.test_loader = self.make_loaders()
        self.steps_per_epoch = len(self.train_loader)
        self.strategy = self.make_strategy()
        self.info = RunInfo(recipe, self.run_dir, self.network, self.built.plans, self.device)
        self.history: list[dict] = []
        self.checkpoints = checkpoints
        self.last_checkpoint: tuple[Path, str, tuple[int, int]] | None = None  # path, where, (step, epochs done)
        self.current: EpochProgress | None = None
        self._resumed: EpochProgress | None = None
        self._stop_requested = False
        self._stopped_by = "Ctrl-C"  # or "SIGTERM": what asked the run to stop
        self._busy = False  # inside a step or a checkpoint write: the state is not consistent

    def make_loaders(self) -> tuple[DataLoader, DataLoader]:
        """The training and test loaders (a distributed trainer shards them); sets ``train_size``,
        the images of the whole training set."""
        train, test = make_loaders(self.recipe, self.dataset, self.device)
        self.train_size = len(train.dataset)
        return train, test

    def make_strategy(self) -> Any:
        """The run's strategy, with one optimizer and schedule per module (greedy) or one (end to end)."""
        recipe = self.recipe
        return STRATEGIES[recipe.run.mode](
            self.network, recipe.optimizer.create(), recipe.schedule.create(),
            self.steps_per_epoch * recipe.run.epochs, self.steps_per_epoch, precision=self.precision,
        )

    # -- checkpoints ---------------------------------------------------------------------

    def checkpoint_state(self) -> dict:
        """Everything a resumed run needs, as tensors and plain containers (``weights_only`` loads it)."""
        cur = self.current
        mid_epoch = cur is not None and cur.epoch == len(self.history) + 1
        partial = None
        if mid_epoch:
            partial = {
                "loss": list(cur.stats.loss), "correct": list(cur.stats.correct), "seen": list(cur.stats.seen),
                "images": cur.images, "elapsed_s": cur.elapsed(),
            }
        return {
            "format": CHECKPOINT_FORMAT,
            "contsup": __version__,
            "recipe": self.recipe.table(),
            "epoch": cur.epoch if mid_epoch else len(self.history) + 1,
            "batch": cur.done if mid_epoch else 0,
            "steps_per_epoch": self.steps_per_epoch,
            "global_step": self.info.step,
            "model": self.network.state_dict(),
            "optimizers": [o.state_dict() for o in self.strategy.optimizers],
            "schedulers": [s.state_dict() for s in self.strategy.schedulers],
            "scalers": [s.state_dict() for s in getattr(self.strategy, "scalers", [])],
            "rng": rng_state(),
            "data_generator": cur.start_state if mid_epoch else self.train_loader.generator.get_state(),
            "partial": partial,
            "history": [dict(m) for m in self.history],
        }

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the run as it stands (between two steps); None when checkpoints are off.
        Parameters that became non-finite stop the run instead, keeping the last good checkpoint."""
        if not self.checkpoints:
            return None
        here = (self.info.step, len(self.history))
        if self.last_checkpoint is not None and self.last_checkpoint[2] == here:
            return self.last_checkpoint[0]  # nothing changed since
        for m in self.network.blocks:
            floats = [t.detach().flatten().float() for t in m.state_dict().values() if t.is_floating_point()]
            if floats and not bool(torch.isfinite(torch.cat(floats)).all()):
                raise NonFiniteLoss(
                    f"the parameters of module {m.index} became non-finite by step {self.info.step}; "
                    f"{self._calmer()}; {self._kept()}"
                )
        self._busy = True
        state = self.checkpoint_state()
        try:
            path = save_checkpoint(self.run_dir, state)
        except OSError as exc:
            raise TrainingFailed(
                f"cannot write a checkpoint into {self.run_dir}: {exc.strerror or exc}; {self._kept()}"
            ) from None
        self._busy = False
        self.last_checkpoint = (path, describe_checkpoint(state), here)
        return path

    def load_state(self, state: dict) -> None:
        """Continue from a checkpoint (see :mod:`contsup.training.checkpoint`): weights, optimizers,
        schedules, scalers, metrics, data order, position and finally the RNG states."""
        try:
            self.network.load_state_dict(state["model"])
            parts = (
                ("optimizer", self.strategy.optimizers, state["optimizers"]),
                ("scheduler", self.strategy.schedulers, state["schedulers"]),
                ("grad scaler", getattr(self.strategy, "scalers", []), state["scalers"]),
            )
            for what, live, saved in parts:
                if len(live) != len(saved):
                    raise ValueError(f"it has {len(saved)} {what}s, this recipe has {len(live)}")
                for obj, s in zip(live, saved):
                    obj.load_state_dict(s)
            if state["batch"] > 0 and state["steps_per_epoch"] != self.steps_per_epoch:
                raise ValueError(
                    f"it stopped inside an epoch of {state['steps_per_epoch']} steps, this recipe has "
                    f"{self.steps_per_epoch} steps per epoch"
                )
            self.train_loader.generator.set_state(state["data_generator"])
            resumed = None
            partial = state.get("partial")
            if partial is not None:
                stats = StepStats(self.network.num_modules)
                stats.loss, stats.correct, stats.seen = list(partial["loss"]), list(partial["correct"]), list(partial["seen"])
                if not len(stats.loss) == len(stats.correct) == len(stats.seen) == self.network.num_modules:
                    raise ValueError("its running sums do not have one entry per module")
                resumed = EpochProgress(
                    state["epoch"], state["data_generator"], stats, done=state["batch"],
                    images=int(partial["images"]), elapsed_s=float(partial["elapsed_s"]),
                )
            set_rng_state(state["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ContsupError(
                f"the checkpoint cannot be restored into this run ({reason(exc)}); "
                f"if the recipe changed, resume with the run's own recipe"
            ) from None
        self.history = [dict(m) for m in state["history"]]
        self.info.step = state["global_step"]
        self.info.epoch = len(self.history)
        self._resumed = resumed

    def _calmer(self) -> str:
        """What to change when training diverges."""
        warmup = getattr(self.recipe.schedule.options, "warmup_epochs", None)
        if warmup is None:
            return "lower optimizer.lr"
        if warmup > 0:
            return f"lower optimizer.lr or lengthen schedule.warmup_epochs (now {warmup:g})"
        return "lower optimizer.lr or add schedule.warmup_epochs"

    def _kept(self) -> str:
        """What is left to resume from, for failure messages."""
        if not self.checkpoints:
            return "checkpoints are off, nothing was saved"
        if self.last_checkpoint is None:
            return "no checkpoint was written yet"
        path, where, _ = self.last_checkpoint
        return f"the last good checkpoint is {path} ({where})"

    # -- stopping ------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop after the current step, writing a checkpoint (what the first Ctrl-C does)."""
        self._stop_requested = True

    def _interrupt(self) -> Interrupted:
        """Write a checkpoint if the state is consistent, then say how to continue."""
        resume = f"continue with: contsup train --resume {self.run_dir}"
        how = "interrupted" if self._stopped_by == "Ctrl-C" else f"stopped by {self._stopped_by}"
        if not self._busy and self.checkpoints:
            self.save_checkpoint()
            path, where, _ = self.last_checkpoint
            return stopped(self._stopped_by, f"{how} at {where}; saved checkpoint {path}; {resume}")
        if self.last_checkpoint is None:
            resume += " (it starts again from the beginning)"
        return stopped(self._stopped_by, f"{how} in the middle of a step; {self._kept()}; {resume}")

    @contextlib.contextmanager
    def _ctrl_c_stops_at_a_step(self) -> Iterator[None]:
        """The first Ctrl-C (or SIGTERM) asks to stop after the current step; a second one stops at once."""

        def handler(name: str) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stopped_by = name
            self.request_stop()
            again = " (press it again to stop at once)" if name == "Ctrl-C" else ""
            sys.stderr.write(f"\n{name}: stopping after this step to save a checkpoint{again}\n")
            sys.stderr.flush()

        with stop_signals(handler):
            yield

    # -- training ------------------------------------------------------------------------

    def _check(self, epoch: int, step: int) -> Callable[[int, torch.Tensor], None]:
        def check(module: int, loss: torch.Tensor) -> None:
            if not torch.isfinite(loss.detach()).all():
                raise NonFiniteLoss(
                    f"the loss of module {module} became {float(loss.detach()):.4g} at epoch {epoch}, step {step}; "
                    f"{self._calmer()}; {self._kept()}"
                )

        return check

    def _unusable_batch(self, exc: BatchError, epoch: int, step: int) -> TrainingFailed:
        """A local loss that cannot be computed on this batch: which module, where, and what to change."""
        module = getattr(self.strategy, "active_module", None)
        d = self.recipe.data
        short = step == self.steps_per_epoch and not d.drop_last and self.train_size % d.batch_size
        remedy = (
            f"it is the epoch's last, short batch ({short} image{'s' if short > 1 else ''}): set data.drop_last = true to leave it out"
            if short else "use a larger data.batch_size"
        )
        where = f"module {module}" if module is not None else "the network"
        return TrainingFailed(f"{where} cannot train on step {step} of epoch {epoch}: {one_line(str(exc))}; {remedy}; {self._kept()}")

    def _out_of_memory(self, epoch: int, step: int, evaluating: bool) -> OutOfMemory:
        k, units = self.network.num_modules, len(self.built.unit_shapes)
        module = getattr(self.strategy, "active_module", None)
        if evaluating:
            what = f"evaluating after epoch {epoch}; lower data.test_batch_size"
        elif module is None:
            what = (
                f"training end to end at epoch {epoch}, step {step}; train greedily "
                f"(run.mode = \"greedy\", partition.modules >= 2) or lower data.batch_size"
            )
        else:
            more = f"use more modules (partition.modules = {min(2 * k, units)}), " if k < units else ""
            what = (
                f"in module {module} of {k} at epoch {epoch}, step {step}; {more}"
                f"balance the modules by memory (partition.use = \"memory_balanced\") or lower data.batch_size"
            )
        return OutOfMemory(f"the GPU ran out of memory {what}; {self._kept()}")

    def begin_epoch(self, epoch: int) -> EpochProgress:
        """Training mode and where the epoch starts: after the steps of a mid-epoch checkpoint it
        was resumed from, with their running sums, or at its first step."""
        self.network.train()
        cur = self._resumed if self._resumed is not None and self._resumed.epoch == epoch else None
        self._resumed = None
        if cur is None:
            cur = EpochProgress(epoch, self.train_loader.generator.get_state(), StepStats(self.network.num_modules))
        self.current = cur
        return cur

    @contextlib.contextmanager
    def training_failures(self, epoch: int, cur: EpochProgress) -> Iterator[None]:
        """Training steps that run out of GPU memory, or meet a batch their local loss cannot use,
        end in one line naming the module, the epoch and the step (every trainer's steps run in this)."""
        try:
            yield
        except torch.cuda.OutOfMemoryError:
            raise self._out_of_memory(epoch, cur.done + 1, evaluating=False) from None
        except BatchError as exc:
            raise self._unusable_batch(exc, epoch, cur.done + 1) from None

    def train_epoch(self, epoch: int) -> dict:
        """One epoch of training then evaluation; returns that epoch's metrics. An epoch resumed
        from a mid-epoch checkpoint continues after its last step with its running sums."""
        cur = self.begin_epoch(epoch)
        every = self.recipe.run.checkpoint_every_steps
        progress = Progress(epoch, self.recipe.run.epochs, self.steps_per_epoch, self.recipe.run.log_every, done=cur.done)
        cur.restart_clock()
        with self.training_failures(epoch, cur), contextlib.closing(progress):
            for x, y in epoch_batches(self.train_loader, cur.start_state, cur.done):
                x = to_memory_format(x.to(self.device, non_blocking=True), self.channels_last)
                y = y.to(self.device, non_blocking=True)
                self._busy = True
                self.strategy.step(x, y, cur.stats, self._check(epoch, cur.done + 1))
                cur.done += 1
                cur.images += len(y)
                self.info.step += 1
                self._busy = False
                progress.update(cur.done, cur.stats.mean_loss())
                if self._stop_requested:
                    raise self._interrupt()
                if every and self.info.step % every == 0 and cur.done < self.steps_per_epoch:
                    self.save_checkpoint()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = cur.elapsed()
        try:
            result = evaluate(self.network, self.test_loader, self.device, self.precision, self.channels_last)
        except torch.cuda.OutOfMemoryError:
            raise self._out_of_memory(epoch, cur.done, evaluating=True) from None
        return epoch_metrics(epoch, self.info.step, self.strategy.lr(), cur.stats, result, cur.images, elapsed, self.device)

    def fit(self, on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
        """Train the remaining epochs; ``on_epoch`` sees each epoch's metrics (e.g. to write them)."""
        self._stop_requested = False
        with self._ctrl_c_stops_at_a_step():
            try:
                return self._fit(on_epoch)
            except KeyboardInterrupt:
                raise self._interrupt() from None

    def _fit(self, on_epoch: Callable[[dict], None] | None) -> list[dict]:
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
            self.save_checkpoint()
            if self.hook is not None:
                self.hook.on_epoch_end(run=self.info, epoch=epoch, metrics=metrics)
            if self._stop_requested:
                raise self._interrupt()
        if self.hook is not None:
            self.hook.on_run_end(run=self.info, metrics=self.history[-1] if self.history else None)
        return self.history


def epoch_metrics(
    epoch: int, step: int, lr: float, stats: StepStats, result: Evaluation, images: int, elapsed: float,
    device: torch.device,
) -> dict:
    """One epoch's line of metrics.jsonl (docs/runs.md describes every field)."""
    memory, memory_kind = peak_memory(device)
    return {
        "epoch": epoch,
        "step": step,
        "lr": lr,
        "train_loss": stats.mean_loss(),
        "train_acc_pct": stats.accuracy(),
        "test_error_pct": result.error_pct,
        "test_loss": result.loss,
        "test_local_acc_pct": result.local_acc_pct,
        "images_per_s": images / elapsed if elapsed > 0 else None,
        "epoch_time_s": elapsed,
        "peak_memory_bytes": memory,
        "memory_kind": memory_kind,
    }


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_line(m: dict, epochs: int) -> str:
    """One readable line per epoch."""
    local = [f"{a:.1f}" for a in m["test_local_acc_pct"] if a is not None]
    if len(local) > 8:
        local = local[:3] + ["..."] + local[-3:]
    return (
        f"epoch {m['epoch']}/{epochs}: test error {m['test_error_pct']:.2f}% | "
        f"local acc % {' '.join(local) or '-'} | {_number(m['images_per_s'], '.0f')} img/s | {m['epoch_time_s']:.1f}s"
    )


__all__ = ["Trainer", "evaluate", "seed_everything", "resolve_device", "Sequence"]

"""Data-parallel training: every rank holds the whole network and trains on its share of each batch.

``data.batch_size`` is the batch of all ranks together: every rank draws the same seeded
permutation as one process would and takes a contiguous slice of each batch. Each rank weighs
its local loss by its share of the batch and each module's gradients are summed over the ranks
(one flat buffer per module) before its optimizer step, so every rank takes the step one process
would take on the whole batch. With ``distributed.sync_batchnorm`` the batch-norm statistics
cover the whole batch too (:mod:`contsup.syncbn`); then N ranks x b images match one process x
N*b images up to floating-point summation order.
"""

from __future__ import annotations

import functools
import os
import random
import sys
from pathlib import Path
from typing import Any, Iterator, TextIO

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from contsup.distributed import DistributedTrainer, Silent, World
from contsup.distributed_bench import Clock, epoch_entry
from contsup.engine import (
    EpochProgress, EvalCounts, StepStats, check_batches, epoch_metrics, evaluation_counts, seed_everything,
)
from contsup.errors import ContsupError
from contsup.order import SkippingBatchSampler, epoch_batches, ignore_interrupts
from contsup.precision import to_memory_format
from contsup.progress import Progress
from contsup.syncbn import convert_sync_batchnorm

RANK_SEED = 1_000_003  # ranks above 0 draw augmentation from seed + rank * RANK_SEED


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of ``rank``'s contiguous share of n items (the first n % world ranks get one more)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ShardedBatchSampler(SkippingBatchSampler):
    """This rank's slice of every batch of the one-process order (same generator, same batches)."""

    def __init__(
        self, dataset_size: int, batch_size: int, generator: torch.Generator, rank: int, world: int, drop_last: bool = False
    ) -> None:
        super().__init__(dataset_size, batch_size, generator, drop_last)
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in super().__iter__():
            start, end = shard_bounds(len(batch), self.rank, self.world)
            yield batch[start:end]


def global_batch_size(step: int, dataset_size: int, batch_size: int) -> int:
    """Images in 0-based batch ``step`` of an epoch (the last one may be short)."""
    return min(batch_size, dataset_size - step * batch_size)


def _worker_init(rank: int, worker_id: int) -> None:
    """Loader worker: Ctrl-C is the main process's; ranks above 0 draw other augmentations."""
    ignore_interrupts(worker_id)
    if rank:
        seed = (torch.initial_seed() + rank * RANK_SEED) % 2**63
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)


def broadcast_tensors(tensors: list[torch.Tensor], world: World, what: str) -> None:
    """Overwrite ``tensors`` with rank 0's values, one flat buffer per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        with world.guard(what):
            dist.broadcast(flat, src=0)
        offset = 0
        with torch.no_grad():
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


class ReducingScaler:
    """A module's grad scaler that weighs the local loss by this rank's share of the batch and sums
    the module's gradients over the ranks (one flat buffer) just before its optimizer step."""

    def __init__(self, inner: Any, world: World, clock: Clock) -> None:
        self.inner, self.world, self.clock = inner, world, clock
        self.share = 1.0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.inner.scale(loss if self.share == 1.0 else loss * self.share)

    def step(self, optimizer: torch.optim.Optimizer) -> Any:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads and self.world.size > 1:
            with self.clock.measure("communicate"):
                flat = torch.cat([g.reshape(-1) for g in grads])
                self.world.all_reduce(flat, "summing gradients")
                offset = 0
                for g in grads:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
        return self.inner.step(optimizer)

    def update(self, *args: Any) -> None:
        self.inner.update(*args)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def _stats_tensor(stats: StepStats) -> torch.Tensor:
    """[loss sums | correct | seen | 1 where a head does not classify], float64: (4K,)."""
    missing = [1.0 if c is None else 0.0 for c in stats.correct]
    return torch.tensor(list(stats.loss) + [c or 0 for c in stats.correct] + list(stats.seen) + missing, dtype=torch.float64)


def _stats_from(t: torch.Tensor, k: int) -> StepStats:
    loss, correct, seen, missing = t.view(4, k).tolist()
    stats = StepStats(k)
    stats.loss = loss
    stats.correct = [None if m > 0 else int(round(c)) for c, m in zip(correct, missing)]
    stats.seen = [int(round(s)) for s in seen]
    return stats


class DataParallelTrainer(DistributedTrainer):
    """Data-parallel greedy (or end-to-end) training on one rank."""

    def __init__(self, recipe: Any, run_dir: Path, world: World, hook: Any = None, log: TextIO | None = None) -> None:
        self.clock = Clock()
        super().__init__(recipe, run_dir, world, hook=hook, log=log)
        self.clock.device = self.device
        self.sync_batchnorm = recipe.distributed.sync_batchnorm and world.size > 1
        if self.sync_batchnorm:
            convert_sync_batchnorm(self.network, cuda=self.device.type == "cuda")
        if world.size > 1:
            state = list(self.network.state_dict().values())
            broadcast_tensors([t for t in state if t.is_floating_point()], world, "sharing the initial weights")
        if world.rank:
            seed_everything(recipe.run.seed + world.rank * RANK_SEED)
        self.strategy.scalers = [ReducingScaler(s, world, self.clock) for s in self.strategy.scalers]
        self._global_partial: StepStats | None = None

    def make_loaders(self) -> tuple[DataLoader, DataLoader]:
        recipe, world = self.recipe, self.world
        d = recipe.data
        generator = torch.Generator().manual_seed(recipe.run.seed)
        pin = self.device.type == "cuda"
        train_set = self.dataset.load(train=True)
        self.train_size = len(train_set)
        try:
            check_batches(recipe, self.train_size)
        except ContsupError as problem:
            raise problem if world.is_main else Silent(problem.exit_code) from None
        last = self.train_size % d.batch_size
        if 0 < last < world.size and not d.drop_last:
            problem = ContsupError(
                f"{recipe.source}: the training set's {self.train_size} images leave a last batch of {last} "
                f"(data.batch_size = {d.batch_size}), fewer than the {world.size} processes; choose data.batch_size "
                f"so that the last batch is full or holds at least {world.size} images, or set data.drop_last = true"
            )
            raise problem if world.is_main else Silent(problem.exit_code)
        sampler = ShardedBatchSampler(self.train_size, d.batch_size, generator, world.rank, world.size, d.drop_last)
        train = DataLoader(
            train_set, batch_sampler=sampler, generator=generator, num_workers=d.workers, pin_memory=pin,
            worker_init_fn=functools.partial(_worker_init, world.rank) if d.workers > 0 else None,
        )
        test_set = self.dataset.load(train=False)
        start, end = shard_bounds(len(test_set), world.rank, world.size)
        test = DataLoader(
            Subset(test_set, range(start, end)), batch_size=d.test_batch_size or d.batch_size, shuffle=False,
            num_workers=d.workers, pin_memory=pin,
        )
        return train, test

    # -- training ------------------------------------------------------------------------

    def _agree_stop(self) -> None:
        """Every rank stops after the same step if any rank was asked to (one small all-reduce)."""
        flag = torch.tensor([1.0 if self._stop_wanted_at is not None else 0.0], device=self.world.control_device)
        self.world.all_reduce(flag, "agreeing whether to stop", op=dist.ReduceOp.MAX)
        self._stop_requested = bool(flag.item() > 0)

    def train_epoch(self, epoch: int) -> dict:
        self.network.train()
        cur = self._resumed if self._resumed is not None and self._resumed.epoch == epoch else None
        self._resumed = None
        if cur is None:
            cur = EpochProgress(epoch, self.train_loader.generator.get_state(), StepStats(self.network.num_modules))
        self.current = cur
        every = self.recipe.run.checkpoint_every_steps
        stream = sys.stderr if self.world.is_main else open(os.devnull, "w")
        progress = Progress(epoch, self.recipe.run.epochs, self.steps_per_epoch, self.recipe.run.log_every, stream=stream, done=cur.done)
        self.clock.reset()
        cur.restart_clock()
        try:
            for x, y in self.clock.loading(epoch_batches(self.train_loader, cur.start_state, cur.done)):
                x = to_memory_format(x.to(self.device, non_blocking=True), self.channels_last)
                y = y.to(self.device, non_blocking=True)
                n = global_batch_size(cur.done, self.train_size, self.recipe.data.batch_size)
                for scaler in self.strategy.scalers:
                    scaler.share = len(y) / n
                self._busy = True
                with self.clock.measure("compute"), self.world.guard(f"training step {cur.done + 1} of epoch {epoch}"):
                    self.strategy.step(x, y, cur.stats, self._check(epoch, cur.done + 1))
                cur.done += 1
                cur.images += n
                self.info.step += 1
                self._busy = False
                progress.update(cur.done, cur.stats.mean_loss())
                self._agree_stop()
                if self._stop_requested:
                    raise self._interrupt()
                if every and self.info.step % every == 0 and cur.done < self.steps_per_epoch:
                    self.save_checkpoint()
        except torch.cuda.OutOfMemoryError:
            raise self._out_of_memory(epoch, cur.done + 1, evaluating=False) from None
        finally:
            progress.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats = self._reduced(cur.stats)
        elapsed = cur.elapsed()
        try:
            result = self._evaluate()
        except torch.cuda.OutOfMemoryError:
            raise self._out_of_memory(epoch, cur.done, evaluating=True) from None
        self.clock.totals["compute"] -= self.clock.totals["communicate"]  # the gradient sums ran inside the steps
        clocks = self.world.gather_objects(self.clock.snapshot(self.world.rank, elapsed, []), "gathering timings")
        if self.world.is_main:
            self.record_epoch(epoch_entry(epoch, cur.images, elapsed, clocks))
        return epoch_metrics(epoch, self.info.step, self.strategy.lr(), stats, result, cur.images, elapsed, self.device)

    def _reduced(self, stats: StepStats) -> StepStats:
        """The epoch's running sums over every rank's images."""
        t = _stats_tensor(stats).to(self.world.control_device)
        self.world.all_reduce(t, "summing the training metrics")
        return _stats_from(t.cpu(), stats.modules)

    def _evaluate(self) -> Any:
        """Each rank evaluates its slice of the test set; the counts are summed."""
        self._share_batchnorm_statistics()
        counts = evaluation_counts(self.network, self.test_loader, self.device, self.precision, self.channels_last)
        k = counts.modules
        t = torch.tensor(
            [c or 0 for c in counts.correct] + [1.0 if c is None else 0.0 for c in counts.correct]
            + [counts.total, counts.loss_sum], dtype=torch.float64, device=self.world.control_device,
        )
        self.world.all_reduce(t, "summing the test results")
        values = t.cpu().tolist()
        total = EvalCounts(k)
        total.correct = [None if m > 0 else int(round(c)) for c, m in zip(values[:k], values[k : 2 * k])]
        total.total, total.loss_sum = int(round(values[2 * k])), values[2 * k + 1]
        return total.result()

    def _share_batchnorm_statistics(self) -> None:
        """Without synchronised batch norm each rank's running statistics differ: take rank 0's."""
        if not self.sync_batchnorm and self.world.size > 1:
            buffers = [b for b in self.network.buffers() if b.is_floating_point()]
            if buffers:
                broadcast_tensors(buffers, self.world, "sharing batch-norm statistics")

    # -- checkpoints -------------------------------------------------------------------------

    def gather_state(self) -> None:
        self._share_batchnorm_statistics()
        self._global_partial = self._reduced(self.current.stats) if self._mid_epoch() else None

    def checkpoint_state(self) -> dict:
        state = super().checkpoint_state()
        if state["partial"] is not None and self._global_partial is not None:
            g = self._global_partial
            state["partial"].update(loss=list(g.loss), correct=list(g.correct), seen=list(g.seen))
        return state

    def load_state(self, state: dict) -> None:
        """Every rank loads the same checkpoint; its running sums (of every rank's images) stay on rank 0."""
        super().load_state(state)
        if self._resumed is not None and not self.world.is_main:
            self._resumed.stats = StepStats(self.network.num_modules)

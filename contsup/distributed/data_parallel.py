"""Data-parallel training: every rank holds the whole network and trains on its share of each batch.

``data.batch_size`` is the batch of all ranks together: every rank draws the same seeded
permutation as one process would and takes a contiguous slice of each batch. Each rank weighs
its local loss by its share of the batch and each module's gradients are summed over the ranks
(one flat buffer per module) before its optimizer step, so every rank takes the step one process
would take on the whole batch. With ``distributed.sync_batchnorm`` the batch-norm statistics
cover the whole batch too (:mod:`contsup.distributed.syncbn`); then N ranks x b images match one process x
N*b images up to floating-point summation order.
"""

from __future__ import annotations

import contextlib
import functools
import random
from pathlib import Path
from typing import Any, Iterator, TextIO

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from contsup.distributed.world import DistributedTrainer, Group, Silent, World, any_rank
from contsup.distributed.timing import Clock, epoch_entry
from contsup.training.engine import (
    EvalCounts, StepStats, batches_problem, epoch_metrics, evaluation_counts, seed_everything,
)
from contsup.errors import ContsupError
from contsup.training.order import SkippingBatchSampler, epoch_batches, ignore_interrupts
from contsup.training.precision import to_memory_format
from contsup.training.progress import Progress
from contsup.distributed.syncbn import convert_sync_batchnorm

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


def broadcast_tensors(tensors: list[torch.Tensor], group: World | Group, what: str) -> None:
    """Overwrite ``tensors`` with those of the group's first rank (rank 0 of a :class:`World`),
    one flat buffer per dtype."""
    if group.size == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in same])
        group.broadcast(flat, what)
        offset = 0
        with torch.no_grad():
            for t in same:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def share_float_buffers(module: torch.nn.Module, group: World | Group, what: str) -> None:
    """The batch-norm running statistics (every floating-point buffer) of ``module`` taken from
    the group's first rank: ranks that normalise their own slices end up with different ones."""
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if buffers:
        broadcast_tensors(buffers, group, what)


def sharded_loaders(recipe: Any, dataset: Any, device: torch.device, shard: int, shards: int) -> tuple[DataLoader, DataLoader, int]:
    """Shard ``shard`` of ``shards`` of every training batch (in the one-process order) and of the
    test set, and the size of the training set. Shards above 0 draw their own augmentations."""
    d = recipe.data
    generator = torch.Generator().manual_seed(recipe.run.seed)
    pin = device.type == "cuda"
    train_set = dataset.load(train=True)
    sampler = ShardedBatchSampler(len(train_set), d.batch_size, generator, shard, shards, d.drop_last)
    train = DataLoader(
        train_set, batch_sampler=sampler, generator=generator, num_workers=d.workers, pin_memory=pin,
        worker_init_fn=functools.partial(_worker_init, shard) if d.workers > 0 else None,
    )
    test_set = dataset.load(train=False)
    start, end = shard_bounds(len(test_set), shard, shards)
    test = DataLoader(
        Subset(test_set, range(start, end)), batch_size=d.test_batch_size or d.batch_size, shuffle=False,
        num_workers=d.workers, pin_memory=pin,
    )
    return train, test, len(train_set)


def last_batch_problem(recipe: Any, train_size: int, shards: int, whom: str = "processes") -> ContsupError | None:
    """The problem when an epoch has no batch, or its last batch cannot give each of ``shards`` an image."""
    problem = batches_problem(recipe, train_size)
    if problem is not None or recipe.data.drop_last:
        return problem
    batch = recipe.data.batch_size
    last = train_size % batch
    if 0 < last < shards:
        return ContsupError(
            f"{recipe.source}: the training set's {train_size} images leave a last batch of {last} "
            f"(data.batch_size = {batch}), fewer than the {shards} {whom}; choose data.batch_size "
            f"so that the last batch is full or holds at least {shards} images, or set data.drop_last = true"
        )
    return None


class ReducingScaler:
    """A module's grad scaler that weighs the local loss by this rank's share of the batch and sums
    the module's gradients over the ranks of ``group`` (one flat buffer) just before its optimizer step."""

    def __init__(self, inner: Any, group: World | Group, clock: Clock) -> None:
        self.inner, self.group, self.clock = inner, group, clock
        self.share = 1.0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.inner.scale(loss if self.share == 1.0 else loss * self.share)

    def step(self, optimizer: torch.optim.Optimizer) -> Any:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads and self.group.size > 1:
            with self.clock.measure("communicate"):
                flat = torch.cat([g.reshape(-1) for g in grads])
                self.group.all_reduce(flat, "summing gradients")
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
        state = list(self.network.state_dict().values())
        broadcast_tensors([t for t in state if t.is_floating_point()], world, "sharing the initial weights")
        if world.rank:
            seed_everything(recipe.run.seed + world.rank * RANK_SEED)
        self.strategy.scalers = [ReducingScaler(s, world, self.clock) for s in self.strategy.scalers]

    def make_loaders(self) -> tuple[DataLoader, DataLoader]:
        world = self.world
        train, test, self.train_size = sharded_loaders(self.recipe, self.dataset, self.device, world.rank, world.size)
        problem = last_batch_problem(self.recipe, self.train_size, world.size)
        if problem is not None:
            raise problem if world.is_main else Silent(problem.exit_code)
        return train, test

    # -- training ------------------------------------------------------------------------

    def _agree_stop(self) -> None:
        """Every rank stops after the same step if any rank was asked to (one small all-reduce)."""
        self._stop_requested = any_rank(self.world, self._stop_wanted_at is not None, "agreeing whether to stop")

    def train_epoch(self, epoch: int) -> dict:
        cur = self.begin_epoch(epoch)
        every = self.recipe.run.checkpoint_every_steps
        run = self.recipe.run
        progress = Progress(epoch, run.epochs, self.steps_per_epoch, run.log_every, stream=self.progress_stream, done=cur.done)
        self.clock.reset()
        cur.restart_clock()
        with self.training_failures(epoch, cur), contextlib.closing(progress):
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
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats = self.reduced_stats(cur.stats)
        elapsed = cur.elapsed()
        try:
            result = self._evaluate()
        except torch.cuda.OutOfMemoryError:
            raise self._out_of_memory(epoch, cur.done, evaluating=True) from None
        clocks = self.world.gather_objects(self.clock.snapshot(self.world.rank, elapsed, []), "gathering timings")
        if self.world.is_main:
            self.record_epoch(epoch_entry(epoch, cur.images, elapsed, clocks))
        return epoch_metrics(epoch, self.info.step, self.strategy.lr(), stats, result, cur.images, elapsed, self.device)

    def reduced_stats(self, stats: StepStats) -> StepStats:
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
        if not self.sync_batchnorm:
            share_float_buffers(self.network, self.world, "sharing batch-norm statistics")

    # -- checkpoints -------------------------------------------------------------------------

    @property
    def keeps_resumed_sums(self) -> bool:
        return self.world.is_main

    def gather_state(self) -> None:
        self._share_batchnorm_statistics()
        super().gather_state()

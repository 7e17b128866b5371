"""Data-parallel training: every rank holds the whole network and trains on its share of each batch.

``data.batch_size`` is the batch of all ranks together: every rank draws the same seeded
permutation as one process would and takes a contiguous slice of each batch. Each rank weighs
its local loss by its share of the batch and each module's gradients are summed over the ranks
(one flat buffer per module) before its optimizer step, so every rank takes the step one process
would take on the whole batch. With ``distributed.sync_batchnorm`` the batch-norm statistics
cover the whole batch too (:mod:`contsup.distributed.syncbn`); then N ranks x b images match one
process x N*b images up to floating-point summation order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ContextManager, Iterator

import torch

from contsup.distributed.syncbn import convert_sync_batchnorm
from contsup.distributed.timing import Clock
from contsup.distributed.world import Group, Ranks, Silent, World, any_rank
from contsup.training.device import seed_everything
from contsup.training.evaluation import EvalCounts, Evaluation, evaluation_counts
from contsup.training.loaders import batches_problem, make_loaders
from contsup.training.order import RANK_SEED, epoch_batches, global_batch_size
from contsup.training.parallel import Batch, EpochProgress, Gathered, TrainerView
from contsup.training.precision import to_memory_format
from contsup.training.strategies import Check, StepStats, Strategy
from contsup.config.recipe import Recipe


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


def sum_gradients(optimizer: torch.optim.Optimizer, group: World | Group, clock: Clock) -> None:
    """Sum the gradients of ``optimizer``'s parameters over the ranks of ``group``, one flat buffer."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if grads and group.size > 1:
        with clock.measure("communicate"):
            flat = torch.cat([g.reshape(-1) for g in grads])
            group.all_reduce(flat, "summing gradients")
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()


def shard_loaders(recipe: Recipe, dataset: Any, device: torch.device, shard: int, shards: int, whom: str, world: World) -> tuple[Any, Any, int]:
    """Shard ``shard`` of ``shards`` of every batch and of the test set; a last batch that cannot
    give every shard an image is one line on rank 0 (the others stop silently)."""
    train, test, size = make_loaders(recipe, dataset, device, shard, shards)
    problem = batches_problem(recipe, size, shards, whom)
    if problem is not None:
        raise problem if world.is_main else Silent(problem.exit_code)
    return train, test, size


def shard_batches(
    loader: Any, cur: EpochProgress, device: torch.device, channels_last: bool, clock: Clock, train_size: int,
    batch_size: int,
) -> Iterator[Batch]:
    """This shard's slice of each remaining batch of the epoch, counted as the images of the whole
    batch (every shard's), the time spent waiting for data on ``clock``."""
    for x, y in clock.loading(epoch_batches(loader, cur.start_state, cur.done)):
        x = to_memory_format(x.to(device, non_blocking=True), channels_last)
        n = global_batch_size(cur.done, train_size, batch_size)
        yield Batch(x, y.to(device, non_blocking=True), n)


class DataParallel:
    """This rank's part in a data-parallel run (greedy or end to end)."""

    needs_agreement = True
    signal_grace_s = 1.0

    def __init__(self, world: World, recipe: Recipe) -> None:
        self.world, self.recipe = world, recipe
        self.is_main = world.is_main
        self.clock = Clock()
        self.ranks = Ranks(world, recipe, self.clock)
        self.sync_batchnorm = recipe.distributed.sync_batchnorm and world.size > 1
        self.network: torch.nn.Module | None = None
        self.train_size = 0

    def loaders(self, recipe: Recipe, dataset: Any, device: torch.device) -> tuple[Any, Any, int]:
        world = self.world
        train, test, self.train_size = shard_loaders(recipe, dataset, device, world.rank, world.size, "processes", world)
        return train, test, self.train_size

    def attach(self, trainer: TrainerView) -> None:
        """Every rank starts from rank 0's weights; ranks above 0 draw other augmentations."""
        self.ranks.attach(trainer)
        self.network = trainer.network
        if self.sync_batchnorm:
            convert_sync_batchnorm(self.network, cuda=trainer.device.type == "cuda")
        state = list(self.network.state_dict().values())
        broadcast_tensors([t for t in state if t.is_floating_point()], self.world, "sharing the initial weights")
        if self.world.rank:
            seed_everything(self.recipe.run.seed + self.world.rank * RANK_SEED)

    def sync_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        sum_gradients(optimizer, self.world, self.clock)

    def begin_epoch(self) -> None:
        self.clock.reset()

    def batches(self, loader: Any, cur: EpochProgress, device: torch.device, channels_last: bool) -> Iterator[Batch]:
        return shard_batches(loader, cur, device, channels_last, self.clock, self.train_size, self.recipe.data.batch_size)

    def train_step(self, strategy: Strategy, batch: Batch, stats: StepStats, check: Check, epoch: int, step: int) -> None:
        """This rank's slice, its loss weighed by its share of the batch."""
        with self.clock.measure("compute"), self.world.guard(f"training step {step} of epoch {epoch}"):
            strategy.step(batch.x, batch.y, stats, check, len(batch.y) / batch.images)

    def agree_stop(self, wanted: bool) -> bool:
        """Every rank stops after the same step if any rank was asked to (one small all-reduce)."""
        return any_rank(self.world, wanted, "agreeing whether to stop")

    def end_training(self) -> None:
        pass

    def reduce_stats(self, stats: StepStats) -> StepStats:
        t = self.world.all_reduce(stats.as_tensor().to(self.world.control_device), "summing the training metrics")
        return StepStats.from_tensor(t, stats.modules)

    def evaluate(self, trainer: TrainerView) -> Evaluation:
        """Each rank evaluates its slice of the test set; the counts are summed."""
        self._share_batchnorm_statistics()
        counts = evaluation_counts(trainer.network, trainer.test_loader, trainer.device, trainer.precision, trainer.channels_last)
        t = self.world.all_reduce(counts.as_tensor().to(self.world.control_device), "summing the test results")
        return EvalCounts.from_tensor(t, counts.modules).result()

    def _share_batchnorm_statistics(self) -> None:
        """Without synchronised batch norm each rank's running statistics differ: take rank 0's."""
        if not self.sync_batchnorm:
            share_float_buffers(self.network, self.world, "sharing batch-norm statistics")

    def record_epoch(self, epoch: int, images: int, elapsed: float) -> None:
        self.ranks.record_epoch(epoch, images, elapsed, [], {})

    def gather(self, trainer: TrainerView) -> Gathered:
        """Rank 0's batch-norm statistics everywhere, and the running sums of an unfinished epoch."""
        self._share_batchnorm_statistics()
        partial = self.reduce_stats(trainer.current.stats) if trainer.mid_epoch() else None
        return self.ranks.gathered(partial)

    def restore(self, state: dict, resumed: EpochProgress | None) -> None:
        self.ranks.restore(state, resumed, keeps_sums=self.world.is_main)

    def resume_command(self, run_dir: Path) -> str:
        return self.ranks.resume_command(run_dir)

    def guard(self, what: str) -> ContextManager[None]:
        return self.world.guard(what)

    def finish(self, run_dir: Path) -> None:
        self.ranks.finish(run_dir, {})

    def report(self) -> dict:
        return self.ranks.report({})


__all__ = ["DataParallel", "broadcast_tensors", "share_float_buffers", "sum_gradients", "shard_loaders", "shard_batches"]

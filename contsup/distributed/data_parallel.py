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
from typing import Any, Iterator

import torch

from contsup.config.recipe import Recipe
from contsup.distributed.syncbn import convert_sync_batchnorm
from contsup.distributed.timing import Clock, Timings
from contsup.distributed.world import Group, Silent, World, any_rank, RankCollectives
from contsup.training.device import seed_everything
from contsup.training.evaluation import EvalCounts
from contsup.training.loaders import batches_problem, make_loaders
from contsup.training.order import RANK_SEED
from contsup.training.processes import Batch, Setup, local_batches
from contsup.training.strategies import Check, StepStats, Strategy, Updates, make_strategy


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


class DataParallel(RankCollectives):
    """This rank's part in a data-parallel run (greedy or end to end): its slice of every batch,
    and the sums over every rank."""

    needs_agreement = True
    signal_grace_s = 1.0

    def __init__(self, world: World, recipe: Recipe, run_dir: Path | None = None) -> None:
        self.world, self.recipe = world, recipe
        self.rank, self.size = world.rank, world.size
        self.is_main = self.keeps_sums = world.is_main
        self.clock = Clock()
        self.timings = Timings(world, recipe, run_dir, self.clock)
        self.sync_batchnorm = recipe.distributed.sync_batchnorm and world.size > 1
        self.train_size = 0

    def loaders(self, recipe: Recipe, dataset: Any, device: torch.device) -> tuple[Any, Any, int]:
        world = self.world
        train, test, self.train_size = shard_loaders(recipe, dataset, device, world.rank, world.size, "processes", world)
        return train, test, self.train_size

    def strategy(self, setup: Setup) -> Strategy:
        """The recipe's strategy on every rank, from rank 0's weights; ranks above 0 draw other
        augmentations; each module's gradients are summed over the ranks before it steps."""
        network, world = setup.network, self.world
        self.clock.device = setup.device
        if self.sync_batchnorm:
            convert_sync_batchnorm(network, cuda=setup.device.type == "cuda")
        state = list(network.state_dict().values())
        broadcast_tensors([t for t in state if t.is_floating_point()], world, "sharing the initial weights")
        if world.rank:
            seed_everything(self.recipe.run.seed + world.rank * RANK_SEED)
        inner = make_strategy(
            setup.recipe, network, setup.steps_per_epoch, setup.precision,
            sync=lambda optimizer: sum_gradients(optimizer, world, self.clock),
        )
        return DataParallelStrategy(inner, world, self.clock, self.sync_batchnorm)

    def batches(self, loader: Any, start_state: torch.Tensor, done: int, device: torch.device, channels_last: bool) -> Iterator[Batch]:
        return self.clock.loading(
            local_batches(loader, start_state, done, device, channels_last, self.train_size, self.recipe.data.batch_size)
        )

    def any_rank(self, wanted: bool) -> bool:
        """Every rank stops after the same step if any rank was asked to (one small all-reduce)."""
        return any_rank(self.world, wanted, "agreeing whether to stop")



class DataParallelStrategy(Updates):
    """A local strategy on this rank's slice of every batch: its steps timed as computing; rank
    0's batch-norm statistics everywhere before a test or a checkpoint (without synchronised
    batch norm each rank's differ)."""

    def __init__(self, inner: Strategy, world: World, clock: Clock, sync_batchnorm: bool) -> None:
        self.inner, self.world, self.clock, self.sync_batchnorm = inner, world, clock, sync_batchnorm
        self.network, self.modules, self.updates = inner.network, inner.modules, inner.updates

    @property
    def active_module(self) -> int | None:
        return self.inner.active_module

    def step(self, x: torch.Tensor | None, y: torch.Tensor | None, stats: StepStats, check: Check, weight: float = 1.0) -> None:
        with self.clock.measure("compute"):
            self.inner.step(x, y, stats, check, weight)

    def _share_batchnorm_statistics(self) -> None:
        if not self.sync_batchnorm:
            share_float_buffers(self.network, self.world, "sharing batch-norm statistics")

    def evaluate(self, loader: Any, device: torch.device, precision: Any, channels_last: bool) -> EvalCounts:
        self._share_batchnorm_statistics()
        return self.inner.evaluate(loader, device, precision, channels_last)

    def state(self) -> dict[str, Any]:
        self._share_batchnorm_statistics()
        return self.inner.state()


__all__ = [
    "DataParallel", "DataParallelStrategy", "broadcast_tensors", "share_float_buffers", "sum_gradients", "shard_loaders",
]

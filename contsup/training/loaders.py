"""The data loaders of a run: the seeded training order (whole, or one shard of every batch) and
the test set (whole, or one contiguous shard)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Subset

from contsup.errors import ContsupError
from contsup.training.order import ShardedBatchSampler, shard_bounds, shard_worker_init
from contsup.protocols import Dataset

if TYPE_CHECKING:
    from contsup.config.recipe import Recipe


def batches_problem(recipe: Recipe, train_size: int, shards: int = 1, whom: str = "processes") -> ContsupError | None:
    """The problem when an epoch holds no training batch (``data.drop_last`` can leave none), or
    when its last batch cannot give each of ``shards`` an image."""
    d = recipe.data
    if d.drop_last and train_size < d.batch_size:
        return ContsupError(
            f"{recipe.source}: data.drop_last = true leaves no training batch: the training set has {train_size} "
            f"images, fewer than data.batch_size = {d.batch_size}; lower data.batch_size or set data.drop_last = false"
        )
    if d.drop_last:
        return None
    last = train_size % d.batch_size
    if 0 < last < shards:
        return ContsupError(
            f"{recipe.source}: the training set's {train_size} images leave a last batch of {last} "
            f"(data.batch_size = {d.batch_size}), fewer than the {shards} {whom}; choose data.batch_size "
            f"so that the last batch is full or holds at least {shards} images, or set data.drop_last = true"
        )
    return None


def make_loaders(
    recipe: Recipe, dataset: Dataset, device: torch.device, shard: int = 0, shards: int = 1
) -> tuple[DataLoader, DataLoader, int]:
    """Shard ``shard`` of ``shards`` of every training batch, in the order one process draws, and
    of the test set; and the size of the whole training set. Shards above 0 draw their own
    augmentations.

    The training order comes from the loader's own generator (see :mod:`contsup.training.order`);
    its workers start afresh each epoch, seeded from that generator, so a resumed run replays them.
    """
    d = recipe.data
    generator = torch.Generator().manual_seed(recipe.run.seed)
    pin = device.type == "cuda"
    train_set = dataset.load(train=True)
    sampler = ShardedBatchSampler(len(train_set), d.batch_size, generator, shard, shards, d.drop_last)
    train = DataLoader(
        train_set, batch_sampler=sampler, generator=generator, num_workers=d.workers, pin_memory=pin,
        worker_init_fn=functools.partial(shard_worker_init, shard) if d.workers > 0 else None,
    )
    test_set = dataset.load(train=False)
    start, end = shard_bounds(len(test_set), shard, shards)
    test = DataLoader(
        Subset(test_set, range(start, end)), batch_size=d.test_batch_size or d.batch_size, shuffle=False,
        num_workers=d.workers, pin_memory=pin,
    )
    return train, test, len(train_set)


__all__ = ["batches_problem", "make_loaders"]

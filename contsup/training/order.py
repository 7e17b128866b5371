"""The training data order: one seeded permutation per epoch that a resumed run replays exactly.

An epoch's order is fixed by the loader generator's state when the epoch starts. A checkpoint
stores that state and how many batches were already trained; resuming restores the state,
draws the same permutation and skips the batches already done.
"""

from __future__ import annotations

import os
import random
import signal
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler


class SkippingBatchSampler(Sampler[list[int]]):
    """Shuffled batches of indices; ``skip`` batches are dropped once, at the start of the next
    epoch, without loading their data. Draws from ``generator`` exactly as ``shuffle=True`` does."""

    def __init__(self, dataset_size: int, batch_size: int, generator: torch.Generator, drop_last: bool = False) -> None:
        self.batches = BatchSampler(RandomSampler(range(dataset_size), generator=generator), batch_size, drop_last)
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(self.batches):
            if i >= skip:
                yield batch

    def __len__(self) -> int:
        return len(self.batches)


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of ``rank``'s contiguous share of n items (the first n % world ranks get one more)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ShardedBatchSampler(SkippingBatchSampler):
    """Shard ``rank`` of ``world`` of every batch of the one-process order (same generator, same
    batches); with one shard, every batch whole."""

    def __init__(
        self, dataset_size: int, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1,
        drop_last: bool = False,
    ) -> None:
        super().__init__(dataset_size, batch_size, generator, drop_last)
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in super().__iter__():
            start, end = shard_bounds(len(batch), self.rank, self.world)
            yield batch[start:end]


def global_batch_size(step: int, dataset_size: int, batch_size: int) -> int:
    """Images in 0-based batch ``step`` of an epoch, over every shard (the last one may be short)."""
    return min(batch_size, dataset_size - step * batch_size)


RANK_SEED = 1_000_003  # shards above 0 draw augmentation from seed + shard * RANK_SEED


def ignore_interrupts(_worker_id: int) -> None:
    """Data-loader worker init: Ctrl-C and the SIGHUP of a closed terminal (sent to the whole
    process group) are the main process's to handle (it stops at a step boundary)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def leave_process_group() -> None:
    """Data-loader worker init: a process group of its own, so a signal sent to the run's whole
    process group (``kill -TERM -PGID``, a job runner's SIGTERM) reaches the main process alone,
    which stops at a step boundary and then ends its workers itself. SIGTERM keeps its default
    in the worker: the main process (and multiprocessing, at exit) ends a worker with it."""
    os.setpgrp()


def shard_worker_init(shard: int, worker_id: int) -> None:
    """Loader worker of shard ``shard``: Ctrl-C is the main process's; shards above 0 draw other
    augmentations."""
    ignore_interrupts(worker_id)
    leave_process_group()
    if shard:
        seed = (torch.initial_seed() + shard * RANK_SEED) % 2**63
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)


def epoch_batches(loader: DataLoader, start_state: torch.Tensor, done: int) -> Iterator:
    """The epoch's batches after the first ``done``, in the order fixed by ``start_state``.

    Without workers the skipped batches are never loaded (an augmentation drawing from the global
    RNG is restored by the checkpoint's RNG state). With workers they are loaded and dropped, so
    every worker's RNG advances exactly as in an uninterrupted epoch.
    """
    loader.generator.set_state(start_state)
    sampler = loader.batch_sampler
    if loader.num_workers == 0 and isinstance(sampler, SkippingBatchSampler):
        sampler.skip = done
        return iter(loader)
    batches = iter(loader)
    for _ in range(done):
        next(batches)
    return batches

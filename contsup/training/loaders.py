"""The data loaders of a run: the seeded training order (whole, or one shard of every batch) and
the test set (whole, or one contiguous shard)."""

from __future__ import annotations

import functools
import os
import resource
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


FILES_PER_WORKER = 16  # descriptors a loading worker holds: its pipes, and the batches in flight it shares


def ensure_open_files(workers: int) -> None:
    """Data-loading workers pass their batches through file descriptors: under a low open-file
    limit they fail with EMFILE tracebacks, or hang. The soft limit is raised to what they need
    where the hard limit allows; otherwise one line says what to change."""
    if workers <= 0:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        used = 64
    need = used + 32 + FILES_PER_WORKER * workers
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise ContsupError(
            f"data.workers = {workers} needs about {need} open files, and this process may open {hard} (ulimit -n); "
            f"raise the limit (ulimit -n 4096) or lower data.workers (0 reads the data in the main process)"
        )
    target = need if hard == resource.RLIM_INFINITY else min(hard, max(need, 4096))
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


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
    ensure_open_files(d.workers)
    generator = torch.Generator().manual_seed(recipe.run.seed)
    pin = device.type == "cuda"
    classes = check_classes_count(recipe, dataset)
    train_set = dataset.load(train=True)
    check_split(recipe, train_set, "training", classes)
    sampler = ShardedBatchSampler(len(train_set), d.batch_size, generator, shard, shards, d.drop_last)
    train = DataLoader(
        train_set, batch_sampler=sampler, generator=generator, num_workers=d.workers, pin_memory=pin,
        worker_init_fn=functools.partial(shard_worker_init, shard) if d.workers > 0 else None,
    )
    test_set = dataset.load(train=False)
    check_split(recipe, test_set, "test", classes)
    start, end = shard_bounds(len(test_set), shard, shards)
    test = DataLoader(
        Subset(test_set, range(start, end)), batch_size=d.test_batch_size or d.batch_size, shuffle=False,
        num_workers=d.workers, pin_memory=pin,
    )
    return train, test, len(train_set)


def _who(recipe: Recipe) -> str:
    origin = recipe.dataset.origin
    return origin.who() if origin is not None else f"dataset '{recipe.dataset.use}'"


def check_classes_count(recipe: Recipe, dataset: Dataset) -> int:
    """The dataset's number of classes; refused, before training, when fewer than two: its
    classifier is right on every image, a 0 % error that means nothing."""
    n = dataset.info().num_classes
    if n < 2:
        raise ContsupError(
            f"{recipe.source}: {_who(recipe)} has {n} class{'es' if n != 1 else ''}; a classifier needs two or more"
        )
    return n


def check_split(recipe: Recipe, items: object, split: str, classes: int) -> None:
    """Refuse, before training, an empty split, and labels outside ``[0, classes)`` where the
    dataset lists them (``targets``, as torchvision's and the image folders' do)."""
    n = len(items)  # type: ignore[arg-type]
    if n == 0:
        raise ContsupError(f"{recipe.source}: {_who(recipe)} has no {split} images; a run needs some to {'train on' if split == 'training' else 'test on'}")
    targets = getattr(items, "targets", None)
    if targets is None:
        return
    try:
        labels = torch.as_tensor(targets)
    except (TypeError, ValueError, RuntimeError):
        return
    if labels.dim() != 1 or labels.numel() == 0 or labels.is_floating_point():
        return
    bad = labels[(labels < 0) | (labels >= classes)]
    if bad.numel():
        found = ", ".join(str(int(v)) for v in torch.unique(bad)[:5])
        raise ContsupError(
            f"{recipe.source}: {_who(recipe)}'s {split} labels include {found}, outside 0..{classes - 1} "
            f"({classes} classes); every label must be a class index"
        )


__all__ = ["batches_problem", "make_loaders", "ensure_open_files", "check_classes_count", "check_split"]

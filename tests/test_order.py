"""The training data order: the same batches as a plain shuffled loader, and an epoch resumed
after any number of batches continues the same permutation (without loading the skipped ones
when there are no workers)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from contsup.training.order import SkippingBatchSampler, epoch_batches


class Counting(Dataset):
    """Items are their own index; counts how often each is loaded."""

    def __init__(self, n: int) -> None:
        self.n, self.loads = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        self.loads += 1
        return i


def loader(data: Dataset, batch: int, seed: int, workers: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_sampler=SkippingBatchSampler(len(data), batch, g), generator=g, num_workers=workers)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), batch=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_batches_equal_a_plain_shuffled_loader_epoch_after_epoch(n, batch, seed):
    plain = DataLoader(list(range(n)), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))
    ours = loader(Counting(n), batch, seed)
    for _ in range(3):
        assert [b.tolist() for b in plain] == [b.tolist() for b in ours]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), batch=st.integers(1, 9), seed=st.integers(0, 2**31), data=st.data())
def test_a_resumed_epoch_continues_the_same_permutation(n, batch, seed, data):
    first = loader(Counting(n), batch, seed)
    next(iter(first))  # an earlier epoch, so the generator is not fresh
    start = first.generator.get_state()
    whole = [b.tolist() for b in first]
    done = data.draw(st.integers(0, len(whole)))

    dataset = Counting(n)
    again = loader(dataset, batch, seed + 1)  # a new process: its own seed until the state is restored
    rest = [b.tolist() for b in epoch_batches(again, start, done)]
    assert rest == whole[done:]
    assert dataset.loads == sum(len(b) for b in rest)  # the skipped batches were never loaded
    assert [b.tolist() for b in again] == [b.tolist() for b in first]  # and the next epoch agrees too


class Augmented(Counting):
    """Each item draws from the torch RNG of the process that loads it, as augmentations do."""

    def __getitem__(self, i: int) -> float:
        super().__getitem__(i)
        return i + float(torch.rand(()))


def test_with_workers_the_skipped_batches_are_loaded_so_augmentation_replays_exactly():
    first = loader(Augmented(20), 3, 7, workers=2)
    next(iter(first))
    start = first.generator.get_state()
    whole = [b.tolist() for b in first]
    again = loader(Augmented(20), 3, 99, workers=2)
    assert [b.tolist() for b in epoch_batches(again, start, 4)] == whole[4:]

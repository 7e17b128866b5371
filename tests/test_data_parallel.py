"""Data-parallel training: 2 ranks x b images match 1 process x 2b images, every rank stops on
another rank's failure, Ctrl-C and resume across ranks; the sharded data order."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contsup.training.order import ShardedBatchSampler, global_batch_size, shard_bounds
from contsup.distributed.timing import read_report
from contsup.training.order import SkippingBatchSampler
from contsup.training.rundir import read_metrics

from ranks import run_ranks
from tiny import assert_same_runs, one_process, one_thread, tiny_recipe_text  # noqa: F401 (fixture)

DATA = '\n[distributed]\nmode = "data"\ntimeout_s = 30\n'


def data_text(run: Path, **kwargs) -> str:
    """ResNet-20 in 3 modules with R1E context; batch_size is the batch of both ranks together."""
    kwargs.setdefault("batch_size", 16)
    kwargs.setdefault("train_size", 64)  # 4 steps per epoch
    return tiny_recipe_text(run, extra=DATA, **kwargs)




@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    run = folder / "run"
    text = data_text(run, epochs=1)  # few steps: these small networks amplify rounding differences fast
    (folder / "d.toml").write_text(text)
    results = run_ranks(2, ["train", str(folder / "d.toml")], folder / "ranks")
    assert [r.code for r in results] == [0, 0], results[0].err + results[1].err
    return run, text, results


@pytest.fixture(scope="module")
def one_step_on_two_ranks(tmp_path_factory):
    """One step of 2 x 8 images: over more steps these tiny networks amplify rounding differences
    (by 10^4 in one step on some CPUs) past any fixed tolerance."""
    folder = tmp_path_factory.mktemp("step")
    run = folder / "run"
    text = data_text(run, epochs=1, train_size=16)
    (folder / "d.toml").write_text(text)
    results = run_ranks(2, ["train", str(folder / "d.toml")], folder / "ranks")
    assert [r.code for r in results] == [0, 0], results[0].err + results[1].err
    return run, text, results


def test_two_ranks_of_b_images_match_one_process_of_2b(one_step_on_two_ranks, registries, tmp_path):
    """Batch-norm statistics synchronised over the ranks make this hold up to summation order."""
    run, text, _ = one_step_on_two_ranks
    reference = one_process(registries, text, tmp_path / "one")
    saved = torch.load(run / "model.pt", weights_only=True)
    for key, value in reference.network.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(saved[key], value), key
    ours, theirs = read_metrics(run), reference.history
    for a, b in zip(ours, theirs):
        assert a["step"] == b["step"] and a["test_local_acc_pct"] == b["test_local_acc_pct"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["train_acc_pct"] == b["train_acc_pct"] and a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)


def test_end_to_end_training_is_data_parallel_too(registries, tmp_path):
    run = tmp_path / "run"
    text = data_text(run, epochs=1, mode="e2e", train_size=16)  # one step, as above
    (tmp_path / "d.toml").write_text(text)
    results = run_ranks(2, ["train", str(tmp_path / "d.toml")], tmp_path / "ranks")
    assert [r.code for r in results] == [0, 0], results[0].err + results[1].err
    reference = one_process(registries, text, tmp_path / "one")
    saved = torch.load(run / "model.pt", weights_only=True)
    for key, value in reference.network.state_dict().items():
        torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_rank_zero_alone_writes_and_reports_both_ranks(two_ranks):
    run, _, (rank0, rank1) = two_ranks
    assert "data parallel on 2 processes:" in rank0.out and "final test error" in rank0.out
    assert rank1.out == "" and rank1.lines() == []
    report = read_report(run)
    assert report["mode"] == "data" and [r["rank"] for r in report["epochs"][0]["ranks"]] == [0, 1]
    assert all(r["communicate_s"] > 0 for r in report["epochs"][0]["ranks"])
    assert report["epochs"][0]["images"] == 64  # both ranks' images


def nan_in_module_2_on_rank_1(rank: int) -> None:
    """Rank 1's module 2 has a NaN loss from its third step on (rank 0's stays finite)."""
    import attrs

    from contsup.model.network import ContextModule

    if rank != 1:
        return
    original = ContextModule.loss
    calls = {"n": 0}

    def loss(self, out, y, x):
        result = original(self, out, y, x)
        if self.index == 2:
            calls["n"] += 1
            if calls["n"] >= 3:
                return attrs.evolve(result, total=result.total * float("nan"))
        return result

    ContextModule.loss = loss


def test_a_rank_that_fails_stops_the_others_saying_why(tmp_path):
    run = tmp_path / "run"
    (tmp_path / "d.toml").write_text(data_text(run, epochs=2))
    rank0, rank1 = run_ranks(2, ["train", str(tmp_path / "d.toml")], tmp_path / "ranks", patch=nan_in_module_2_on_rank_1, timeout=90)
    own = ("the loss of module 2 became nan at epoch 1, step 3; lower optimizer.lr or add schedule.warmup_epochs; "
           "no checkpoint was written yet")
    assert rank1.code == 1 and rank1.lines() == [f"error: {own}"]
    assert rank0.code == 1 and rank0.seconds < 60
    assert rank0.lines() == [f"error: rank 0: stopping because rank 1 stopped: {own}"]


def ctrl_c_on_rank_1_at_step_3(rank: int) -> None:
    """Rank 1 (not rank 0) gets Ctrl-C after its third step: every rank stops there."""
    from contsup.training import progress

    if rank != 1:
        return
    original = progress.Progress.update

    def update(self, step, losses):
        original(self, step, losses)
        if step == 3 and self.epoch == 1:
            os.kill(os.getpid(), signal.SIGINT)

    progress.Progress.update = update


def test_ctrl_c_on_any_rank_stops_all_at_one_step_and_resume_is_exact(two_ranks, tmp_path):
    straight, _, _ = two_ranks
    run = tmp_path / "run"
    (tmp_path / "d.toml").write_text(data_text(run, epochs=1))
    rank0, rank1 = run_ranks(2, ["train", str(tmp_path / "d.toml")], tmp_path / "first", patch=ctrl_c_on_rank_1_at_step_3)
    assert (rank0.code, rank1.code) == (130, 130), rank0.err + rank1.err
    assert rank0.lines() == [
        f"stopped: interrupted at epoch 1, after step 3 of 4; saved checkpoint {run}/checkpoints/step-000000003.pt; "
        f"continue with: torchrun --nproc_per_node=2 -m contsup train --resume {run}"
    ]
    resumed = run_ranks(2, ["train", "--resume", str(run)], tmp_path / "second")
    assert [r.code for r in resumed] == [0, 0], resumed[0].err + resumed[1].err
    assert_same_runs(straight, run)


# -- the data order ------------------------------------------------------------------------


@given(st.integers(0, 300), st.integers(1, 9))
def test_shards_tile_a_batch_in_order(n, world):
    bounds = [shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [e - s for s, e in bounds]
    assert max(sizes) - min(sizes) <= 1


@settings(deadline=None, max_examples=40)
@given(st.integers(1, 80), st.integers(1, 12), st.integers(1, 4), st.integers(0, 10**6))
def test_sharded_batches_put_together_are_the_one_process_batches(size, batch, world, seed):
    def batches(sampler):
        return list(sampler)

    one = batches(SkippingBatchSampler(size, batch, torch.Generator().manual_seed(seed)))
    shards = [batches(ShardedBatchSampler(size, batch, torch.Generator().manual_seed(seed), r, world)) for r in range(world)]
    assert [sum((s[i] for s in shards), []) for i in range(len(one))] == one
    assert [global_batch_size(i, size, batch) for i in range(len(one))] == [len(b) for b in one]


def test_a_last_batch_smaller_than_the_ranks_is_refused(tmp_path):
    (tmp_path / "d.toml").write_text(data_text(tmp_path / "run", train_size=33, batch_size=16))  # 33 = 16 + 16 + 1
    rank0, rank1 = run_ranks(2, ["train", str(tmp_path / "d.toml")], tmp_path / "ranks")
    assert (rank0.code, rank1.code) == (2, 2)
    assert rank0.lines() == [
        "error: " + str(tmp_path / "d.toml") + ": the training set's 33 images leave a last batch of 1 "
        "(data.batch_size = 16), fewer than the 2 processes; choose data.batch_size so that the last batch is full "
        "or holds at least 2 images, or set data.drop_last = true"
    ]
    assert rank1.lines() == []
    assert not (tmp_path / "run").exists()  # a run that could not start leaves nothing behind
    dropped = run_ranks(2, ["train", str(tmp_path / "d.toml"), "--set", "data.drop_last=true"], tmp_path / "ranks2")
    assert [r.code for r in dropped] == [0, 0]


def test_a_batch_supcon_cannot_use_stops_every_rank_with_one_line(tmp_path):
    """The same failure as in one process: the epoch's short last batch (2 images, one per rank)
    holds no pair of one class; the run says where and what to set."""
    text = data_text(tmp_path / "run", train_size=34, epochs=1) + '\n[objective]\nuse = "supcon"\n'
    (tmp_path / "s.toml").write_text(text)
    rank0, rank1 = run_ranks(2, ["train", str(tmp_path / "s.toml")], tmp_path / "ranks")
    assert (rank0.code, rank1.code) == (1, 1)
    lines = rank0.lines()
    assert len(lines) == 1 and lines[0].startswith("error: module 1 cannot train on step 3 of epoch 1: supcon: ")
    assert lines[0].endswith(
        "it is the epoch's last, short batch (2 images): set data.drop_last = true to leave it out; "
        "no checkpoint was written yet"
    )

"""Launching distributed runs: torchrun's variables, one-line errors when the processes do not fit
the recipe, which rank was lost, and the trainers on a one-rank process group (in this process)."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from contsup.distributed import world as distributed
from contsup.cli import main
from contsup.distributed.world import (
    Launch, PeerLost, World, check_launch, choose_backend, is_communication_error, launch_from_env,
)
from contsup.training.loop import Trainer
from contsup.errors import ContsupError, RecipeError
from contsup.config.recipe import loads_recipe

from ranks import run_ranks
from tiny import one_thread, tiny_recipe_text  # noqa: F401 (fixture)


def recipe_with(registries, tmp_path: Path, distributed_table: str, **kwargs):
    text = tiny_recipe_text(tmp_path / "run", extra=f"\n[distributed]\n{distributed_table}\n", **kwargs)
    return loads_recipe(text, registries, source="r.toml")


# -- torchrun's variables and the launch checks ------------------------------------------------


def test_launch_comes_from_torchruns_variables():
    assert launch_from_env({}) is None
    assert launch_from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Launch(1, 4, 1)
    with pytest.raises(ContsupError, match="not all whole numbers"):
        launch_from_env({"RANK": "one", "WORLD_SIZE": "4"})
    with pytest.raises(ContsupError, match=r"RANK=4 with WORLD_SIZE=4; a rank must be 0..3"):
        launch_from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_a_distributed_recipe_without_torchrun_says_how_to_launch_it(write_recipe, tmp_path, capsys):
    path = write_recipe(tiny_recipe_text(tmp_path / "run", extra='\n[distributed]\nmode = "pipeline"\n'))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"error: {path}: distributed.mode = \"pipeline\" needs several processes started by torchrun: torchrun "
        f"--nproc_per_node=N -m contsup train {path} (see docs/distributed.md), or --set distributed.mode=none for one process"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("table, world, problems", [
    ('mode = "none"', 2, ['r.toml: distributed.mode is "none" but torchrun started 2 processes; set distributed.mode = '
                          '"data" or "pipeline" (--set distributed.mode=pipeline), or run one process']),
    ('mode = "pipeline"', 4, ['r.toml: distributed.mode = "pipeline" with 4 processes needs at least 4 modules, and '
                              'partition.modules is 3; start at most 3 processes (--nproc_per_node) or raise partition.modules']),
    ('mode = "pipeline"\nstages = [1, 2]', 3, ['r.toml: distributed.stages has 2 entries but torchrun started 3 '
                                               'processes; give one module count per process, or [] to balance them automatically']),
    ('mode = "data"', 9, ['r.toml: data.batch_size = 8 is smaller than the 9 processes; each process needs at least '
                          'one image of every batch (data.batch_size is the batch of all processes together)']),
])
def test_processes_that_do_not_fit_the_recipe_are_one_line_each(registries, tmp_path, table, world, problems):
    recipe = recipe_with(registries, tmp_path, table)
    with pytest.raises(ContsupError) as info:
        check_launch(recipe, Launch(0, world, 0))
    assert list(info.value.lines) == problems
    check_launch(recipe_with(registries, tmp_path, 'mode = "pipeline"'), Launch(0, 3, 0))  # fits


def test_a_named_gpu_is_refused_under_torchrun(registries, tmp_path):
    text = tiny_recipe_text(tmp_path / "run", extra='\n[distributed]\nmode = "data"\n').replace('mode = "greedy"', 'mode = "greedy"\ndevice = "cuda:1"')
    with pytest.raises(ContsupError, match=r'run.device = "cuda:1": under torchrun each process uses the GPU numbered by its LOCAL_RANK'):
        check_launch(loads_recipe(text, registries, source="r.toml"), Launch(0, 2, 0))


def test_recipe_checks_of_the_distributed_section(registries, tmp_path):
    with pytest.raises(RecipeError) as info:
        recipe_with(registries, tmp_path, 'mode = "pipeline"\nstages = [1, 1]', mode="e2e")
    assert list(info.value.lines) == [
        'r.toml: distributed.mode: "pipeline" trains each module on its own rank, which needs run.mode = "greedy"; '
        'use distributed.mode = "data" for end-to-end training',
        "r.toml: distributed.stages: [1, 1] holds 2 modules, partition.modules is 3; give counts summing to 3, or [] "
        "to balance them automatically",
    ]
    with pytest.raises(RecipeError, match=r"distributed.stages: every stage needs at least one module, got \[2, 0, 1\]"):
        recipe_with(registries, tmp_path, "stages = [2, 0, 1]")


def test_the_backend_follows_the_device():
    assert choose_backend("auto", torch.device("cpu")) == "gloo"
    assert choose_backend("auto", torch.device("cuda")) == "cpu:gloo,cuda:nccl"
    assert choose_backend("gloo", torch.device("cpu")) == "gloo"


def test_ranks_that_do_not_fit_stop_before_anything_is_written(tmp_path):
    """Every rank stops with status 2; rank 0 alone prints the problems."""
    text = tiny_recipe_text(tmp_path / "run", modules=2, extra='\n[distributed]\nmode = "pipeline"\nstages = [1, 1]\n')
    (tmp_path / "p.toml").write_text(text)
    results = run_ranks(3, ["train", str(tmp_path / "p.toml")], tmp_path / "ranks")
    assert [r.code for r in results] == [2, 2, 2]
    where = tmp_path / "p.toml"
    assert results[0].lines() == [
        f'error: {where}: distributed.mode = "pipeline" with 3 processes needs at least 3 modules, and partition.modules '
        f"is 2; start at most 2 processes (--nproc_per_node) or raise partition.modules",
        f"error: {where}: distributed.stages has 2 entries but torchrun started 3 processes; give one module count per "
        f"process, or [] to balance them automatically",
    ]
    assert results[1].err == results[2].err == ""
    assert not (tmp_path / "run").exists()


# -- which rank was lost -----------------------------------------------------------------------


def test_communication_errors_are_told_from_bugs():
    assert is_communication_error(RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer"))
    assert is_communication_error(RuntimeError("Timed out waiting 2000ms for recv operation to complete"))
    assert not is_communication_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_communication_error(ValueError("Connection"))


def _world(rank: int, size: int, store) -> World:
    return World(Launch(rank, size, rank), store, "gloo", 30.0, torch.device("cpu"))


def test_a_lost_rank_is_named_and_a_rank_that_stopped_says_why(monkeypatch):
    monkeypatch.setattr(distributed, "GRACE_S", 0.2)
    store = dist.HashStore()
    world = _world(0, 3, store)
    world.describe_kept = lambda: "the last good checkpoint is c.pt (end of epoch 1)"
    _world(1, 3, store).store.set("alive/1", "1")  # rank 1 is still there, rank 2 is not
    lost = world.lost("summing gradients", RuntimeError("Connection closed by peer"))
    assert isinstance(lost, PeerLost) and lost.exit_code == 1
    assert lost.lines == (
        "rank 0: rank 2 was lost while summing gradients (the process ended, or did not answer within "
        "distributed.timeout_s = 30 s); the last good checkpoint is c.pt (end of epoch 1)",
    )
    _world(2, 3, store).publish_failure(ContsupError("the loss of module 4 became nan at epoch 2, step 1"))
    assert world.lost("summing gradients", RuntimeError("x")).lines == (
        "rank 0: stopping because rank 2 stopped: the loss of module 4 became nan at epoch 2, step 1; "
        "the last good checkpoint is c.pt (end of epoch 1)",
    )


def test_a_lost_store_is_said_too(monkeypatch):
    world = _world(1, 2, dist.HashStore())

    class Gone:
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise RuntimeError("Connection reset by peer")
            return fail

    world.store = Gone()
    assert world.lost("waiting for rank 0", RuntimeError("x")).lines == (
        "rank 1: lost contact with the other ranks while waiting for rank 0 and with the rendezvous store (rank 0 or "
        "the launcher ended); no checkpoint was written yet",
    )


# -- the trainers on one rank, in this process --------------------------------------------------


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        yield _world(0, 1, dist.HashStore())
    finally:
        dist.destroy_process_group()


def _fit(trainer) -> dict:
    trainer.fit()
    return {k: v.clone() for k, v in trainer.network.state_dict().items()}


@pytest.mark.parametrize("mode", ["data", "pipeline"])
def test_one_rank_trains_exactly_as_one_process(registries, tmp_path, one_rank, mode):
    from contsup.distributed.launch import make_processes

    recipe = recipe_with(registries, tmp_path, f'mode = "{mode}"')
    single = recipe_with(registries, tmp_path, 'mode = "none"')
    ours = _fit(Trainer(recipe, tmp_path / "a", log=open(os.devnull, "w"), processes=make_processes(one_rank, recipe)))
    theirs = _fit(Trainer(single, tmp_path / "b", log=open(os.devnull, "w")))
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def _frozen_batch_norm(self, x):
    """Batch norm from running statistics alone: a network that treats every image on its own."""
    return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def test_micro_batches_accumulate_into_one_step_per_batch(registries, tmp_path, one_rank, monkeypatch):
    """With M micro-batches each module takes one step per batch on the gradient of the whole
    batch: equal to M = 1 where nothing depends on the batch (here: batch norm frozen), up to
    summation order (one epoch: these small networks amplify rounding differences fast)."""
    from contsup.distributed.pipeline import Pipeline

    monkeypatch.setattr(nn.BatchNorm2d, "forward", _frozen_batch_norm)
    runs = {}
    for m in (1, 3):
        recipe = recipe_with(registries, tmp_path, f'mode = "pipeline"\nmicro_batches = {m}', epochs=1)
        trainer = Trainer(recipe, tmp_path / f"m{m}", log=open(os.devnull, "w"), processes=Pipeline(one_rank, recipe))
        runs[m] = (_fit(trainer), trainer)
    (one, t1), (three, t3) = runs[1], runs[3]
    for key in one:
        torch.testing.assert_close(three[key], one[key], rtol=1e-4, atol=1e-6, msg=key)
    assert [s.last_epoch for s in t3.strategy.schedulers] == [s.last_epoch for s in t1.strategy.schedulers] == [4, 4, 4]
    assert t3.history[0]["train_loss"] == pytest.approx(t1.history[0]["train_loss"], rel=1e-5)

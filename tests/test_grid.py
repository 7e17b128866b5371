"""A grid of pipeline stages x data-parallel replicas: 2 stages x 2 replicas of b images match one
process of 2b images, its checkpoints are those of any run, and processes that do not fill the
grid are refused with one line."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch

from contsup.training.checkpoint import checkpoint_paths
from contsup.cli import main
from contsup.distributed.world import Launch, check_launch
from contsup.distributed.timing import read_report
from contsup.errors import ContsupError
from contsup.distributed.stages import Grid, StagePlan
from contsup.config.recipe import loads_recipe
from contsup.training.rundir import read_metrics

from ranks import die_on_message, run_ranks
from tiny import assert_same_runs, one_process, one_thread, tiny_recipe_text  # noqa: F401 (fixture)

GRID = '\n[distributed]\nmode = "pipeline"\nstages = [2, 2]\nreplicas = 2\ntimeout_s = 30\n'


def grid_text(run: Path, **kwargs) -> str:
    """ResNet-20 in 4 modules with R1E context (module 3 takes h_1^c across the stage boundary),
    modules 1-2 and 3-4 on each replica; batch_size is the batch of both replicas together."""
    kwargs.setdefault("batch_size", 16)
    kwargs.setdefault("train_size", 64)  # 4 steps per epoch
    kwargs.setdefault("epochs", 1)  # few steps: these small networks amplify rounding differences fast
    return tiny_recipe_text(run, modules=4, extra=GRID, **kwargs)




def assert_close_weights(state: dict, path: Path) -> None:
    """Equal up to floating-point summation order (the gradients and batch-norm sums of two replicas)."""
    saved = torch.load(path, weights_only=True)
    assert saved.keys() == state.keys()
    for key, value in state.items():
        if value.is_floating_point():
            torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(saved[key], value), key


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grid")
    run = folder / "run"
    # two steps: the reference is one process, and these small float32 networks amplify the
    # replicas' different summation order with every step (1e-3 after four on some CPUs)
    text = grid_text(run, train_size=32).replace("[run]\n", "[run]\ncheckpoint_every_steps = 1\n")
    # context.start = 1.0: at the default 0.1 this data puts one ReLU input of module 3 within
    # rounding of zero, so the replicas pass no gradient where one process passes some, and batch
    # norm's backward spreads that element over its channel (1-8 % of module 3's gradients, 1e-4
    # in the weights): a threshold flip that any other summation order can cause, not a defect
    text = text.replace('[context]\nuse = "R1E"\n', '[context]\nuse = "R1E"\nstart = 1.0\n')
    assert "start = 1.0" in text
    (folder / "g.toml").write_text(text)
    results = run_ranks(4, ["train", str(folder / "g.toml")], folder / "ranks")
    assert [r.code for r in results] == [0, 0, 0, 0], "\n".join(r.err for r in results)
    return run, text, results


def test_two_stages_by_two_replicas_match_one_process_on_the_global_batch(grid_run, registries, tmp_path):
    run, text, (rank0, *others) = grid_run
    reference = one_process(registries, text, tmp_path / "one")
    assert_close_weights(reference.network.state_dict(), run / "model.pt")
    for ours, theirs in zip(read_metrics(run), reference.history, strict=True):
        assert ours["step"] == theirs["step"] and ours["test_local_acc_pct"] == theirs["test_local_acc_pct"]
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
        assert ours["train_acc_pct"] == theirs["train_acc_pct"]
        assert ours["test_loss"] == pytest.approx(theirs["test_loss"], rel=1e-5)
    assert ("pipeline of 2 stages x 2 replicas, as distributed.stages says: stage 0 (ranks 0, 2): modules 1-2; "
            "stage 1 (ranks 1, 3): modules 3-4") in rank0.out
    assert all(r.out == "" and r.lines() == [] for r in others)  # rank 0 alone speaks


def test_a_grid_run_is_evaluated_and_loaded_like_any_run(grid_run, capsys):
    import contsup

    run, _, _ = grid_run
    network = contsup.load_model(run)
    saved = torch.load(run / "model.pt", weights_only=True)
    for key, value in network.state_dict().items():
        assert torch.equal(value, saved[key]), key
    final = torch.load(checkpoint_paths(run)[-1], weights_only=True)  # the end of the epoch
    for key, value in final["model"].items():
        assert torch.equal(value, saved[key]), key
    assert final["distributed"]["world_size"] == 4 and len(final["distributed"]["rng"]) == 4
    assert main(["eval", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    last = read_metrics(run)[-1]
    assert report["test_error_pct"] == pytest.approx(last["test_error_pct"])
    assert report["local_acc_pct"] == pytest.approx(last["test_local_acc_pct"])
    assert network(torch.zeros(2, 3, 8, 8)).shape == (2, 10)


def stopped_copy(run, copy):
    """A copy of a finished grid run as it stood at its mid-epoch checkpoint (step 1 of 2)."""
    shutil.copytree(run, copy)
    for path in checkpoint_paths(copy)[1:]:
        path.unlink()
        path.with_name(path.name + ".sha256").unlink()
    (copy / "model.pt").unlink()
    return copy


def test_a_grid_checkpoint_resumes_in_one_process(grid_run, registries, tmp_path):
    """The mid-epoch checkpoint holds every stage's modules and optimizers and the running sums
    of both replicas' images."""
    run, text, _ = grid_run
    copy = stopped_copy(run, tmp_path / "copy")
    assert main(["train", "--resume", str(copy), "--set", "distributed.mode=none", "--force"]) == 0
    reference = one_process(registries, text, tmp_path / "one")
    assert_close_weights(reference.network.state_dict(), copy / "model.pt")
    assert read_metrics(copy)[-1]["train_loss"] == pytest.approx(reference.history[-1]["train_loss"], rel=1e-5)
    assert read_metrics(copy)[-1]["train_acc_pct"] == reference.history[-1]["train_acc_pct"]


def test_a_grid_run_resumes_on_the_grid_exactly(grid_run, tmp_path):
    """From the mid-epoch checkpoint, 4 ranks again end where the uninterrupted run ended."""
    run, _, _ = grid_run
    copy = stopped_copy(run, tmp_path / "copy")
    results = run_ranks(4, ["train", "--resume", str(copy)], tmp_path / "ranks")
    assert [r.code for r in results] == [0, 0, 0, 0], "\n".join(r.err for r in results)
    assert "(epoch 1, after step 1 of 2)" in results[0].out
    assert_same_runs(run, copy)


def test_distributed_json_reports_the_grid(grid_run):
    run, _, _ = grid_run
    report = read_report(run)
    assert (report["mode"], report["world_size"], report["stages"], report["replicas"]) == ("pipeline", 4, 2, 2)
    (epoch,) = report["epochs"]
    assert epoch["images"] == 32  # both replicas' images
    assert [r["modules"] for r in epoch["ranks"]] == [[1, 2], [3, 4], [1, 2], [3, 4]]
    assert all(r["communicate_s"] > 0 for r in epoch["ranks"])  # the gradient sums across replicas


def test_processes_that_do_not_fill_the_grid_stop_with_one_line(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(grid_text(tmp_path / "run"))
    results = run_ranks(3, ["train", str(path)], tmp_path / "ranks")
    assert [r.code for r in results] == [2, 2, 2]
    assert results[0].lines() == [
        f"error: {path}: distributed.stages has 2 entries and distributed.replicas is 2, which needs 2 x 2 = 4 "
        f"processes, but torchrun started 3; start 4 processes (--nproc_per_node) or change distributed.replicas"
    ]
    assert results[1].err == results[2].err == ""
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("table, world, problems", [
    ('stages = []\nreplicas = 2', 3, [
        "r.toml: distributed.replicas = 2 needs a number of processes that 2 divides (stages x replicas), but torchrun "
        "started 3; start a multiple of 2 processes (--nproc_per_node) or change distributed.replicas"]),
    ('replicas = 2', 10, [
        'r.toml: distributed.mode = "pipeline" with 10 processes in 2 replicas needs at least 5 modules, and '
        "partition.modules is 4; start at most 8 processes (--nproc_per_node) or raise partition.modules"]),
    ('replicas = 9', 18, [
        "r.toml: data.batch_size = 8 is smaller than the 9 replicas (distributed.replicas); each replica needs at "
        "least one image of every batch (data.batch_size is the batch of all replicas together)"]),
])
def test_grid_launch_checks_are_one_line_each(registries, tmp_path, table, world, problems):
    def recipe(table: str):
        text = tiny_recipe_text(tmp_path / "run", modules=4, extra=f'\n[distributed]\nmode = "pipeline"\n{table}\n')
        return loads_recipe(text, registries, source="r.toml")

    with pytest.raises(ContsupError) as info:
        check_launch(recipe(table), Launch(0, world, 0))
    assert list(info.value.lines) == problems
    for fits in (2, 4, 8):  # 1, 2 or 4 stages x 2 replicas
        check_launch(recipe("replicas = 2"), Launch(0, fits, 0))


def test_ranks_are_laid_out_replica_by_replica():
    grid = Grid(stages=3, replicas=2)
    assert [grid.place(r) for r in range(6)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert grid.column(1) == [1, 4]
    assert StagePlan((1, 3)).describe(replicas=3) == (
        "pipeline of 2 stages x 3 replicas, as distributed.stages says: stage 0 (ranks 0, 2, 4): module 1; "
        "stage 1 (ranks 1, 3, 5): modules 2-4"
    )


# Rank 3 (replica 1, stage 1) ends abruptly, as a killed process does, when its third micro-batch arrives.
die_on_third_message = functools.partial(die_on_message, victim=3, nth=3)


def test_a_rank_that_dies_stops_every_other_rank_with_one_line(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(grid_text(tmp_path / "run", epochs=2))
    results = run_ranks(4, ["train", str(path)], tmp_path / "ranks", patch=die_on_third_message, timeout=90)
    assert results[3].code == 9
    for rank, result in enumerate(results[:3]):
        assert result.code == 1 and result.seconds < 60, result.err
        (line,) = result.lines()
        assert line.startswith(f"error: rank {rank}: rank 3 was lost while "), line
        assert line.endswith("(the process ended, or did not answer within distributed.timeout_s = 30 s); "
                             "no checkpoint was written yet"), line

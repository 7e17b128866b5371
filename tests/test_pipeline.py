"""Pipeline (module-parallel) training: bit-identical to sequential greedy training with one
micro-batch, context tensors crossing a stage boundary intact, a lost rank stopping the others,
Ctrl-C and resume across ranks, stage balancing and the message format."""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contsup.training.checkpoint import checkpoint_paths
from contsup.cli import main
from contsup.distributed.timing import read_report
from contsup.training.loop import Trainer
from contsup.training.strategies import GreedyStrategy
from contsup.model.network import ContextStore
from contsup.partition import min_max_split
from contsup.types import Costs
from contsup.distributed.messages import HEAD, SPEC, Message, decode_header, encode_header
from contsup.distributed.stages import StagePlan, crossing
from contsup.config.recipe import loads_recipe
from contsup.training.rundir import read_metrics

from conftest import ROOT
from ranks import die_on_message, run_ranks
from tiny import one_process, one_thread, tiny_recipe_text, without_measured  # noqa: F401 (fixture)

PIPELINE = '\n[distributed]\nmode = "pipeline"\nstages = [2, 2]\ntimeout_s = 30\n'


def pipeline_text(run: Path, **kwargs) -> str:
    """ResNet-20 in 4 modules with R1E context, modules 1-2 on rank 0 and 3-4 on rank 1: module 3
    takes h_1^c from rank 0 and x, module 4 takes h_2^c (made on rank 1) and x."""
    return tiny_recipe_text(run, modules=4, extra=PIPELINE, **kwargs)




def assert_same_weights(state: dict, path: Path) -> None:
    saved = torch.load(path, weights_only=True)
    assert saved.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(saved[key], value), key  # max difference 0


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    """A real ``torchrun --standalone --nproc_per_node=2 -m contsup train`` of a pipeline recipe."""
    folder = tmp_path_factory.mktemp("torchrun")
    run = folder / "run"
    recipe = folder / "pipeline.toml"
    recipe.write_text(pipeline_text(run))
    env = {
        **os.environ, "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "contsup",
         "train", str(recipe)],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run, recipe.read_text(), proc


def test_torchrun_pipeline_equals_sequential_greedy_training(torchrun_run, registries, tmp_path):
    run, text, proc = torchrun_run
    reference = one_process(registries, text, tmp_path / "sequential")
    assert_same_weights(reference.network.state_dict(), run / "model.pt")
    assert without_measured(read_metrics(run)) == without_measured(reference.history)
    assert "pipeline of 2 stages, as distributed.stages says: rank 0: modules 1-2; rank 1: modules 3-4" in proc.stdout
    assert "pipeline parallel on 2 processes:" in proc.stdout and "final test error:" in proc.stdout


def test_a_pipeline_run_is_evaluated_and_loaded_like_any_run(torchrun_run, capsys):
    import contsup

    run, _, _ = torchrun_run
    assert main(["eval", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    last = read_metrics(run)[-1]
    assert report["weights"] == "model.pt"
    assert report["test_error_pct"] == pytest.approx(last["test_error_pct"])
    assert report["local_acc_pct"] == pytest.approx(last["test_local_acc_pct"])
    network = contsup.load_model(run)
    assert network(torch.zeros(2, 3, 8, 8)).shape == (2, 10)


def test_distributed_json_reports_throughput_and_every_stage(torchrun_run):
    run, _, _ = torchrun_run
    report = read_report(run)
    assert report["mode"] == "pipeline" and report["world_size"] == 2 and report["backend"] == "gloo"
    assert [e["epoch"] for e in report["epochs"]] == [1, 2]
    for epoch in report["epochs"]:
        assert epoch["images"] == 32 and epoch["images_per_s"] > 0
        assert [r["modules"] for r in epoch["ranks"]] == [[1, 2], [3, 4]]
        for r in epoch["ranks"]:
            assert 0 < r["compute_s"] <= r["wall_s"] * 1.05 and 0 < r["utilisation"] <= 1.05
            # every activity within the epoch's training time (evaluation's waits are not in it)
            assert sum(r[f"{a}_s"] for a in ("compute", "load", "receive", "send", "communicate")) <= r["wall_s"] * 1.05
    assert set(report["overall"]["utilisation"]) == {"0", "1"}


def test_a_pipeline_checkpoint_resumes_in_one_process(torchrun_run, registries, tmp_path):
    """Checkpoints gather every stage's modules, optimizers and schedules into the one-process format."""
    run, text, _ = torchrun_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    newest = checkpoint_paths(copy)[-1]
    newest.unlink()
    newest.with_name(newest.name + ".sha256").unlink()
    (copy / "model.pt").unlink()
    assert main(["train", "--resume", str(copy), "--set", "distributed.mode=none", "--force"]) == 0
    reference = one_process(registries, text, tmp_path / "sequential")
    assert_same_weights(reference.network.state_dict(), copy / "model.pt")


# -- in-test ranks --------------------------------------------------------------------------


def record_first_message(rank: int, path: str) -> None:
    """Rank 1 saves the tensors of the first micro-batch it receives into ``path``."""
    from contsup.distributed import messages as pipeline  # the messages between stages

    if rank != 1:
        return
    original = pipeline.Inbox.receive

    def receive(self):
        message = original(self)
        if message.kind == pipeline.TRAIN and message.step == 1:
            torch.save(list(message.tensors), path)
        return message

    pipeline.Inbox.receive = receive


def test_context_tensors_crossing_a_stage_boundary_arrive_intact(registries, tmp_path, monkeypatch):
    """Rank 1 gets module 2's output h_2, the labels, x (for module 3's and 4's E context) and
    h_1^c (module 3's R1 context, made on rank 0) exactly as one process computes them."""
    text = pipeline_text(tmp_path / "run", epochs=1)
    (tmp_path / "p.toml").write_text(text)
    record = functools.partial(record_first_message, path=str(tmp_path / "received.pt"))
    results = run_ranks(2, ["train", str(tmp_path / "p.toml")], tmp_path / "ranks", patch=record)
    assert [r.code for r in results] == [0, 0], [r.err for r in results]
    received = torch.load(tmp_path / "received.pt", weights_only=True)

    recipe = loads_recipe(text.replace('mode = "pipeline"', 'mode = "none"'), registries, source="tiny.toml")
    trainer = Trainer(recipe, tmp_path / "one", log=open(os.devnull, "w"))
    assert crossing(trainer.network, 2).features == (1,) and crossing(trainer.network, 2).needs_x
    seen: dict = {}
    original_add, original_step = ContextStore.add, GreedyStrategy.step

    def add(self, j, hc):
        seen.setdefault(f"h{j}", hc.detach().clone())
        original_add(self, j, hc)

    def step(self, x, y, stats, check, *weight):
        seen.setdefault("x", x.clone())
        seen.setdefault("y", y.clone())
        original_step(self, x, y, stats, check, *weight)

    trainer.network.blocks[1].body.register_forward_hook(lambda mod, inp, out: seen.setdefault("h2_out", out.detach().clone()))
    monkeypatch.setattr(ContextStore, "add", add)
    monkeypatch.setattr(GreedyStrategy, "step", step)
    trainer.fit()
    h, y, x, h1 = received
    assert torch.equal(h, seen["h2_out"]) and torch.equal(y, seen["y"])
    assert torch.equal(x, seen["x"]) and torch.equal(h1, seen["h1"])


# Rank 1 ends abruptly, as a killed process does, when its third micro-batch arrives.
die_on_third_message = functools.partial(die_on_message, victim=1, nth=3)


def test_a_rank_that_dies_stops_the_others_with_one_line(tmp_path):
    text = pipeline_text(tmp_path / "run", epochs=2, train_size=64)  # 8 steps per epoch: still training
    (tmp_path / "p.toml").write_text(text)
    rank0, rank1 = run_ranks(2, ["train", str(tmp_path / "p.toml")], tmp_path / "ranks", patch=die_on_third_message, timeout=90)
    assert rank1.code == 9
    assert rank0.code == 1 and rank0.seconds < 60
    assert rank0.lines() == [
        "error: rank 0: rank 1 was lost while waiting for rank 1 to take a message (the process ended, or did not "
        "answer within distributed.timeout_s = 30 s); no checkpoint was written yet"
    ] or rank0.lines() == [
        "error: rank 0: rank 1 was lost while sending a train message to rank 1 (the process ended, or did not "
        "answer within distributed.timeout_s = 30 s); no checkpoint was written yet"
    ], rank0.err


def ctrl_c_after_second_step(rank: int) -> None:
    """Rank 0 gets Ctrl-C right after its second step."""
    from contsup.training import progress

    if rank != 0:
        return
    original = progress.Progress.update

    def update(self, step, losses):
        original(self, step, losses)
        if step == 2 and self.epoch == 1:
            os.kill(os.getpid(), signal.SIGINT)

    progress.Progress.update = update


def test_ctrl_c_stops_every_rank_at_one_step_and_the_run_resumes_exactly(registries, tmp_path):
    run = tmp_path / "run"
    text = pipeline_text(run).replace("[run]\n", "[run]\ncheckpoint_every_steps = 3\n")
    (tmp_path / "p.toml").write_text(text)
    rank0, rank1 = run_ranks(2, ["train", str(tmp_path / "p.toml")], tmp_path / "first", patch=ctrl_c_after_second_step)
    assert (rank0.code, rank1.code) == (130, 130), rank0.err + rank1.err
    assert rank0.lines() == [
        f"stopped: interrupted at epoch 1, after step 2 of 4; saved checkpoint {run}/checkpoints/step-000000002.pt; "
        f"continue with: torchrun --nproc_per_node=2 -m contsup train --resume {run}"
    ]
    assert rank1.lines() == []
    resumed = run_ranks(2, ["train", "--resume", str(run)], tmp_path / "second")
    assert [r.code for r in resumed] == [0, 0], resumed[0].err + resumed[1].err
    assert f"resuming {run} from {run}/checkpoints/step-000000002.pt (epoch 1, after step 2 of 4)" in resumed[0].out
    reference = one_process(registries, text, tmp_path / "sequential")
    assert_same_weights(reference.network.state_dict(), run / "model.pt")
    assert without_measured(read_metrics(run)) == without_measured(reference.history)


def test_stages_balanced_by_measured_time_give_the_same_weights(registries, tmp_path):
    """How modules are spread over ranks changes where they run, never what they compute."""
    run = tmp_path / "run"
    text = pipeline_text(run, epochs=1).replace("stages = [2, 2]", "stages = []")
    (tmp_path / "p.toml").write_text(text)
    rank0, rank1 = run_ranks(2, ["train", str(tmp_path / "p.toml")], tmp_path / "ranks")
    assert (rank0.code, rank1.code) == (0, 0), rank0.err + rank1.err
    assert "pipeline of 2 stages, balanced by measured time per micro-batch: rank 0: module" in rank0.out
    reference = one_process(registries, text, tmp_path / "sequential")
    assert_same_weights(reference.network.state_dict(), run / "model.pt")


# -- pieces ----------------------------------------------------------------------------------


def _brute_force(costs: list[float], parts: int) -> float:
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=9).flatmap(
    lambda costs: st.tuples(st.just(costs), st.integers(1, len(costs)))))
def test_balanced_split_is_optimal(case):
    costs, parts = case
    sizes = min_max_split(Costs(tuple(float(c) for c in costs)), parts)
    assert len(sizes) == parts and all(s >= 1 for s in sizes) and sum(sizes) == len(costs)
    bounds = [0, *itertools.accumulate(sizes)]
    largest = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
    assert largest == _brute_force(costs, parts)


def test_stage_plan_names_each_ranks_modules():
    plan = StagePlan((3, 1), (0.001, 0.002, 0.003, 0.006))
    assert plan.modules(0) == (1, 3) and plan.modules(1) == (4, 4) and plan.owner(4) == 1
    assert plan.describe() == (
        "pipeline of 2 stages, balanced by measured time per micro-batch: rank 0: modules 1-3 (6.0 ms); "
        "rank 1: module 4 (6.0 ms)"
    )


DTYPE_CHOICES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6), st.integers(0, 10**9), st.integers(0, 7), st.integers(1, 8), st.integers(0, 4096),
    st.lists(st.tuples(st.sampled_from(DTYPE_CHOICES), st.lists(st.integers(0, 7), max_size=5)), max_size=5),
)
def test_a_header_describes_its_message_exactly(kind, step, micro, count, batch, specs):
    tensors = tuple(torch.zeros(shape, dtype=dtype) for dtype, shape in specs)
    header = encode_header(Message(kind, step, micro, count, batch, tensors), slots=5)
    assert header.shape == (HEAD + 5 * SPEC,) and header.dtype == torch.int64
    message, decoded = decode_header(header)
    assert (message.kind, message.step, message.micro, message.micro_count, message.batch) == (kind, step, micro, count, batch)
    assert decoded == [(t.dtype, tuple(t.shape)) for t in tensors]


def test_only_what_later_modules_use_crosses_a_boundary(small_recipe):
    from contsup.model.network import build_network

    net = build_network(small_recipe(modules=6, context="R1")).network
    assert crossing(net, 3).features == (2,) and not crossing(net, 3).needs_x  # module 4 takes h_2^c
    net = build_network(small_recipe(modules=6, context="all")).network
    assert crossing(net, 3).features == (0, 1, 2) and crossing(net, 3).needs_x
    net = build_network(small_recipe(modules=4, context="none")).network
    assert crossing(net, 2).count == 2  # h and y alone

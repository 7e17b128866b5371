"""AugLocal heads, the training methods and recomputed adapters in distributed training: data-parallel
(2 gloo ranks of b images) matches one process of 2b images for AugLocal, BackLink, MAN and HPFF, and trains the same
with the adapters recomputed as without; AugLocal in the pipeline is bit-identical to sequential
greedy training (its heads are local to their module, so nothing new crosses)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from contsup.training.rundir import read_metrics

from ranks import run_ranks
from tiny import assert_same_runs, one_process, one_thread, tiny_recipe_text, without_measured  # noqa: F401 (fixture)

AUGLOCAL = '\n[objective]\nuse = "cross_entropy"\nhead = "auglocal"\ndepth = 2\n'
BACKLINK = "\n[backlink]\nunits = 1\n"
METHODS = {"auglocal": AUGLOCAL, "backlink": BACKLINK, "man": "\n[man]\n", "hpff": "\n[hpff]\n"}
DATA = '\n[distributed]\nmode = "data"\ntimeout_s = 30\n'
PIPELINE = '\n[distributed]\nmode = "pipeline"\nstages = [2, 2]\ntimeout_s = 30\n'


def _train_ranks(tmp_path: Path, text: str) -> Path:
    (tmp_path / "d.toml").write_text(text)
    results = run_ranks(2, ["train", str(tmp_path / "d.toml")], tmp_path / "ranks")
    assert [r.code for r in results] == [0, 0], results[0].err + results[1].err
    return tmp_path / "run"


@pytest.mark.parametrize("method", list(METHODS))
def test_data_parallel_matches_one_process(registries, tmp_path, method):
    extra = METHODS[method] + DATA
    # two steps: these small networks amplify the ranks' other summation order fast
    text = tiny_recipe_text(tmp_path / "run", epochs=1, batch_size=16, train_size=32, modules=3, extra=extra)
    run = _train_ranks(tmp_path, text)
    reference = one_process(registries, text, tmp_path / "one")
    saved = torch.load(run / "model.pt", weights_only=True)
    assert saved.keys() == reference.network.state_dict().keys()
    for key, value in reference.network.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(saved[key], value), key
    for a, b in zip(read_metrics(run), reference.history):
        assert a["step"] == b["step"] and a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_auglocal_in_the_pipeline_is_exactly_one_process(registries, tmp_path):
    text = tiny_recipe_text(tmp_path / "run", modules=4, extra=AUGLOCAL + PIPELINE)
    run = _train_ranks(tmp_path, text)
    reference = one_process(registries, text, tmp_path / "sequential")
    saved = torch.load(run / "model.pt", weights_only=True)
    state = reference.network.state_dict()
    assert saved.keys() == state.keys() and any(".head.features." in key for key in state)
    for key, value in state.items():
        assert torch.equal(saved[key], value), key
    assert without_measured(read_metrics(run)) == without_measured(reference.history)


def test_recomputed_adapters_train_data_parallel_as_kept_ones(tmp_path):
    """context.recompute and recompute_head under data parallelism: the ranks' batch norms are
    synchronised ones, so the adapters' and heads' recomputation in backward runs their collectives
    again (checkpointing, in the same order on every rank; the channel chunks need a plain batch
    norm) and puts their running statistics back. The run is bit-identical to the one that keeps
    the activations."""
    runs = []
    for name, context in (("kept", "R1E"), ("recomputed", 'R1E"\nrecompute = true\nrecompute_head = true\n#')):
        text = tiny_recipe_text(tmp_path / name, epochs=1, batch_size=16, train_size=32, modules=3, context=context, extra=DATA)
        (tmp_path / f"{name}.toml").write_text(text)
        results = run_ranks(2, ["train", str(tmp_path / f"{name}.toml")], tmp_path / f"ranks-{name}")
        assert [r.code for r in results] == [0, 0], results[0].err + results[1].err
        runs.append(tmp_path / name)
    assert_same_runs(*runs)

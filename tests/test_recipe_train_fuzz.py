"""Past validation: generated recipes and ``--set`` values on tiny data either stop with a
:class:`ContsupError` of one-line messages (a bad recipe, a device this machine lacks, a loss
that became NaN) or train their first step and checkpoint it; never any other exception.

A few examples run by default; ``pytest -m fuzz`` runs many more."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from contsup import api
from contsup.config.reading import parse_toml, set_path
from contsup.core import tomlw
from contsup.errors import ContsupError
from contsup.training.failures import Interrupted
from contsup.training.stopping import StopRequests

from tiny import one_thread, tiny_recipe_text  # noqa: F401 (one_thread: a fixture, applied here)

BIG = [2**31, 2**53, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**400]
plausible = st.sampled_from([0, 1, 2, 0.0, 0.01, 0.1, 0.5, 0.9])  # so that many recipes stay valid and train
numbers = st.one_of(
    plausible,
    plausible,
    st.sampled_from([0, -1, 1, 2, 3, 0.5, -0.0, 1e-300, 1e38, 3.5e38, 1e308, *BIG]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**70), 2**70),
)
wrong = st.one_of(st.booleans(), st.text(max_size=6), st.lists(st.integers(-2, 4), max_size=3), st.just({}))
# Sizes that decide how much data the run makes stay tiny when valid; beyond them, only invalid ones.
small = st.one_of(st.integers(-2, 24), st.sampled_from([2**63, -(2**63) - 1, 1.5]), wrong)
shape = st.one_of(st.lists(st.integers(-1, 12), min_size=0, max_size=4), st.lists(st.sampled_from(BIG), max_size=3), wrong)

KEYS = {
    "run.seed": st.one_of(numbers, wrong),
    "run.epochs": st.one_of(st.integers(-1, 3), numbers, wrong),
    "run.mode": st.sampled_from(["greedy", "e2e", "nope", ""]),
    "run.device": st.sampled_from(["cpu", "auto", "cuda", "cuda:7", "mps", "tpu"]),
    "run.precision": st.sampled_from(["fp32", "bf16", "fp16", "fp8"]),
    "run.checkpoint_every_steps": st.one_of(small, numbers),
    "run.log_every": st.one_of(small, numbers),
    "run.deterministic": st.one_of(st.booleans(), wrong),
    "run.channels_last": st.booleans(),
    "run.init": st.sampled_from(["default", "official", "x"]),
    "data.batch_size": st.one_of(small, numbers),
    "data.test_batch_size": st.one_of(small, numbers),
    "data.workers": st.sampled_from([0, 0, 0, 1, -1, 1025, 2**63, "2"]),
    "data.drop_last": st.one_of(st.booleans(), wrong),
    "data.train_size": small,
    "data.test_size": small,
    "data.classes": small,
    "data.shape": shape,
    "data.noise": st.one_of(numbers, wrong),
    "data.seed": st.one_of(numbers, wrong),
    "backbone.use": st.sampled_from(["cifar_resnet20", "cifar_resnet32", "resnet", ""]),
    "partition.modules": st.one_of(st.integers(-1, 12), numbers, wrong),
    "partition.use": st.sampled_from(["uniform", "memory_balanced", "cuts", "nope"]),
    "decoder": st.sampled_from([{"use": "infopro", "ixx_1": 1.0, "ixy_1": 1.0, "ixx_2": 0.0, "ixy_2": 1.0},
                                {"use": "infopro"}, {"use": "nope"}]),
    "context.recent": st.one_of(st.integers(-1, 3), numbers),
    "objective.hidden": small,
    "context.use": st.sampled_from(["none", "R1E", "R2", "M1R1E", "E", "nope"]),
    "objective.use": st.sampled_from(["cross_entropy", "supcon", "infopro", "nope"]),
    "optimizer.lr": st.one_of(numbers, wrong),
    "optimizer.momentum": st.one_of(numbers, wrong),
    "optimizer.nesterov": st.one_of(st.booleans(), wrong),
    "optimizer.weight_decay": st.one_of(numbers, wrong),
    "schedule.use": st.sampled_from(["cosine", "constant", "official_cosine", "step"]),
    "schedule.warmup_epochs": st.one_of(numbers, wrong),
    "backlink.units": st.one_of(st.integers(-1, 4), numbers),
    "distributed.mode": st.sampled_from(["none", "none", "data", "pipeline"]),
    "log.tensorboard": st.just(False),
}


def literal(value) -> str:
    """``value`` as a TOML literal for --set (a string quoted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(repr(value), repr(value))
    if isinstance(value, list):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {literal(v)}" for k, v in value.items()) + "}"
    return json.dumps(value) if isinstance(value, str) else str(value)


def stop_after_the_first_step(self: StopRequests) -> bool:
    """What a Ctrl-C during the first step does: the run stops after it with a checkpoint (the
    loop first asks whether to stop once its first step is done)."""
    self.agreed = True
    return self.agreed


def check_train(tmp_path, monkeypatch, data) -> None:
    monkeypatch.setattr(StopRequests, "agree", stop_after_the_first_step)
    out = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
    recipe = parse_toml(tiny_recipe_text(out, epochs=1, train_size=16, batch_size=8), "tiny")
    sets = []
    count = data.draw(st.integers(1, 3))
    for key in data.draw(st.permutations(sorted(KEYS)))[:count]:  # distinct keys (unique lists reject half the draws)
        value = data.draw(KEYS[key])
        if data.draw(st.booleans()):  # in the recipe file
            assert set_path(recipe, key.split("."), value) is None
        else:
            sets.append(f"{key}={literal(value)}")
    path = out.with_suffix(".toml")
    try:
        path.write_text(tomlw.dumps(recipe))
    except (TypeError, ValueError):  # a value TOML cannot write (a list of mixed types)
        event("not written: TOML cannot hold it")
        return
    try:
        run = api.train(path, sets)
    except Interrupted as exc:  # stopped after the first step
        assert "after step 1 of" in str(exc) and list((out / "checkpoints").glob("*.pt")), exc.lines
        event("trained its first step")
    except ContsupError as exc:
        assert exc.lines and all(line and "\n" not in line for line in exc.lines), exc.lines
        event(f"refused: {type(exc).__name__}")
    else:
        assert (run.run_dir / "model.pt").exists()
        event("trained its one step and finished")


TRAIN = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])


@settings(max_examples=12, **TRAIN)
@given(data=st.data())
def test_generated_recipes_fail_in_one_line_or_train_their_first_step(tmp_path, monkeypatch, capsys, data):
    check_train(tmp_path, monkeypatch, data)
    assert "Traceback" not in "".join(capsys.readouterr())


@pytest.mark.fuzz
@settings(max_examples=400, **TRAIN)
@given(data=st.data())
def test_many_generated_recipes_fail_in_one_line_or_train_their_first_step(tmp_path, monkeypatch, capsys, data):
    check_train(tmp_path, monkeypatch, data)
    assert "Traceback" not in "".join(capsys.readouterr())


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """A valid recipe trains one step and stops with a checkpoint; a bad one is a ContsupError."""
    monkeypatch.setattr(StopRequests, "agree", stop_after_the_first_step)
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_recipe_text(tmp_path / "run", epochs=3, train_size=16, batch_size=8))
    with pytest.raises(Interrupted, match="after step 1 of 2"):
        api.train(path)
    with pytest.raises(ContsupError, match="run.seed: must be a 64-bit integer"):
        api.train(path, ["run.seed=18446744073709551616", "run.out_dir=" + str(tmp_path / "other")])

"""Checkpoint files: plain tensors and containers only, atomic, the last two kept, RNG states
round-trip, and every kind of damage is detected and reported as one line."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contsup.training.checkpoint import (
    CorruptCheckpoint, checkpoint_paths, load_latest, read_checkpoint, rng_state, save_checkpoint, set_rng_state,
)
from contsup.training.loop import Trainer
from contsup.errors import ContsupError
from contsup.cli import main
from contsup.config.recipe import load_recipe, loads_recipe
from contsup.training.rundir import read_metrics

from tiny import one_thread, tiny_recipe_text  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def trained_state(registries, tmp_path_factory):
    """A tiny one-epoch run (4 steps) and its run directory."""
    run = tmp_path_factory.mktemp("ckpt")
    recipe = loads_recipe(tiny_recipe_text(run, epochs=1), registries, source="tiny.toml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    trainer = Trainer(recipe, run, log=open(os.devnull, "w"))
    trainer.fit()
    torch.set_num_threads(threads)
    return trainer, run


def test_a_checkpoint_holds_everything_and_loads_with_weights_only(trained_state):
    trainer, run = trained_state
    path = checkpoint_paths(run)[-1]
    state = torch.load(path, weights_only=True)  # plain tensors and containers only
    assert state["format"] == 1 and state["recipe"] == trainer.recipe.table()
    assert (state["epoch"], state["batch"], state["global_step"], state["steps_per_epoch"]) == (2, 0, 4, 4)
    assert state["model"].keys() == trainer.network.state_dict().keys()
    assert len(state["optimizers"]) == len(state["schedulers"]) == len(state["scalers"]) == 3  # one per module
    assert all(s["last_epoch"] == 4 for s in state["schedulers"])
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert state["data_generator"].dtype == torch.uint8
    assert state["history"] == trainer.history and state["partial"] is None
    assert (path.parent / (path.name + ".sha256")).read_text().split()[1] == str(path.stat().st_size)


def test_rng_states_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    saved = rng_state()
    first = (random.random(), np.random.normal(), torch.rand(3))
    set_rng_state(saved)
    again = (random.random(), np.random.normal(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def _fake_state(step: int) -> dict:
    return {"global_step": step, "payload": torch.full((4,), float(step))}


def test_only_the_last_two_are_kept_and_a_failed_write_leaves_the_old_ones(tmp_path, monkeypatch):
    for step in (1, 2, 3, 10):
        save_checkpoint(tmp_path, _fake_state(step))
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "step-000000003.pt", "step-000000003.pt.sha256", "step-000000010.pt", "step-000000010.pt.sha256",
    ]

    def dies_half_way(obj, f):
        f.write(b"PK\x03\x04 half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, _fake_state(11))
    assert sorted(p.name for p in folder.iterdir()) == [
        "step-000000003.pt", "step-000000003.pt.sha256", "step-000000010.pt", "step-000000010.pt.sha256",
    ]  # no temporary file left, nothing replaced


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda b: b[: len(b) // 2], "truncated or extended"),
        (lambda b: b"", "truncated or extended: 0 bytes"),
        (lambda b: b[:-40] + bytes(x ^ 0xFF for x in b[-40:-39]) + b[-39:], "SHA-256 mismatch"),
        (lambda b: os.urandom(len(b)), "SHA-256 mismatch"),
    ],
    ids=["truncated", "empty", "one byte flipped", "garbage"],
)
def test_damage_is_detected_and_the_previous_checkpoint_used(trained_state, tmp_path, damage, reason):
    trainer, _ = trained_state
    good = trainer.checkpoint_state()
    save_checkpoint(tmp_path, good)
    later = dict(good, global_step=good["global_step"] + 1)
    latest = save_checkpoint(tmp_path, later)
    latest.write_bytes(damage(latest.read_bytes()))
    warnings = []
    state, path = load_latest(tmp_path, warnings.append)
    assert path.name == "step-000000004.pt" and state["global_step"] == 4
    assert len(warnings) == 1 and warnings[0].startswith(f"checkpoint {latest} is damaged: ") and reason in warnings[0]
    assert warnings[0].endswith("; using the one before it")
    assert checkpoint_paths(tmp_path) == [path] and (latest.parent / (latest.name + ".corrupt")).exists()


def test_without_its_digest_a_damaged_file_is_still_caught_by_its_structure(trained_state, tmp_path):
    trainer, _ = trained_state
    latest = save_checkpoint(tmp_path, trainer.checkpoint_state())
    (latest.parent / (latest.name + ".sha256")).unlink()
    assert read_checkpoint(latest)["global_step"] == 4  # a complete file loads without its digest
    latest.write_bytes(latest.read_bytes()[:5000])
    with pytest.raises(CorruptCheckpoint, match=r"not a readable checkpoint \("):
        read_checkpoint(latest)
    torch.save({"format": 1, "epoch": "one"}, latest)
    with pytest.raises(CorruptCheckpoint, match="its 'recipe' entry is missing or malformed"):
        read_checkpoint(latest)
    torch.save([1, 2, 3], latest)
    with pytest.raises(CorruptCheckpoint, match="holds a list, not a checkpoint"):
        read_checkpoint(latest)


def test_when_no_checkpoint_is_usable_every_problem_is_reported(tmp_path):
    for step in (1, 2):
        save_checkpoint(tmp_path, _fake_state(step))  # readable files, but not checkpoints
    with pytest.raises(ContsupError) as err:
        load_latest(tmp_path, lambda line: None)
    lines = err.value.lines
    assert list(lines[:2]) == [
        f"checkpoint {tmp_path / 'checkpoints' / name} is damaged: its 'format' entry is missing or malformed"
        for name in ("step-000000002.pt", "step-000000001.pt")
    ]
    assert lines[2] == f"{tmp_path}: none of its checkpoints is usable; start the run again with --new"
    assert load_latest(tmp_path / "elsewhere", lambda line: None) is None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_damaged_checkpoints_never_crash(trained_state, tmp_path, data):
    """Cut or flipped bytes, with or without the digest: either a checked state comes back (and
    restores, or says why not) or CorruptCheckpoint says why; nothing else escapes."""
    trainer, run = trained_state
    raw = checkpoint_paths(run)[-1].read_bytes()
    cut = data.draw(st.integers(0, len(raw)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)), max_size=4))
    damaged = bytearray(raw[:cut] if data.draw(st.booleans()) else raw)
    for at, mask in flips:
        if at < len(damaged):
            damaged[at] ^= mask
    target = Path(tempfile.mkdtemp(dir=tmp_path)) / "step-000000004.pt"
    target.write_bytes(bytes(damaged))
    if data.draw(st.booleans()):  # with its digest, any change must be caught
        digest = checkpoint_paths(run)[-1].with_name("step-000000004.pt.sha256")
        target.with_name(digest.name).write_bytes(digest.read_bytes())
    try:
        state = read_checkpoint(target)
    except CorruptCheckpoint as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert isinstance(state, dict) and state["global_step"] == 4
        if target.with_name("step-000000004.pt.sha256").exists():
            assert bytes(damaged) == raw
        try:  # restoring it either works or says why in one line
            trainer.load_state(state)
        except ContsupError as exc:
            assert len(exc.lines) == 1 and "cannot be restored into this run" in exc.lines[0]

def test_written_files_get_the_usual_permissions_not_private_ones(tmp_path):
    import stat

    from contsup.training.rundir import UMASK, atomic_write

    path = tmp_path / "model.pt"
    atomic_write(path, lambda f: f.write(b"x"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~UMASK
    assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044 & ~UMASK  # group and others may read unless umask says no


# -- checkpoints written by contsup 0.1.0 before the one-loop refactor ------------------------------

OLD_RUN = Path(__file__).parent / "data" / "run-0.1.0"
# ``OMP_NUM_THREADS=1 contsup train`` of tests/tiny.py's tiny recipe for one epoch at commit
# bf52a7d (before the training layer was rewritten around one loop); its recipe.toml says so.


def assert_near(a, b, where: str = "") -> None:
    """``a`` equals ``b``, container by container, but for float32 rounding in tensors and numbers:
    the old file was written on another machine, whose CPU kernels may round a sum differently in
    the last bit (bit-exact arithmetic on one machine is what the resume tests pin)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=where)
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_near(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_near(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7), where
    else:
        assert a == b, where


def test_a_checkpoint_written_before_the_refactor_loads_and_matches_a_run_of_today(registries, tmp_path):
    """The refactor kept the checkpoint format and the training arithmetic: the old file loads
    (digest checked), and the same recipe trained now, as it was then, writes the same state (to
    float32 rounding: see :func:`assert_near`); it restores into today's trainer."""
    import subprocess
    import sys

    old = read_checkpoint(OLD_RUN / "checkpoints" / "step-000000004.pt")
    out = tmp_path / "now"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # context.start came later (its default, 0.1, scales the adapters at construction): the old run's
    # adapters started at PyTorch's initialisation, which start = 1.0 is
    command = [sys.executable, "-m", "contsup", "train", str(OLD_RUN / "recipe.toml"), "--set", f'run.out_dir="{out}"',
               "--set", "context.start=1.0"]
    subprocess.run(command, env=env, check=True, capture_output=True)
    now = read_checkpoint(out / "checkpoints" / "step-000000004.pt")
    assert (now["format"], now["epoch"], now["batch"], now["global_step"]) == (old["format"], old["epoch"], old["batch"], old["global_step"])
    assert_near(now["model"], old["model"], "model")
    # foreach says how SGD computes its update (multi-tensor since, bit-equal: tests/test_optim.py), not what it is
    for state in now["optimizers"]:
        for group in state["param_groups"]:
            assert group.pop("foreach") is True
    for state in old["optimizers"]:
        for group in state["param_groups"]:
            assert group.pop("foreach") is None
    assert_near(now["optimizers"], old["optimizers"], "optimizers")
    assert now["schedulers"] == old["schedulers"]
    measured = ("images_per_s", "epoch_time_s", "peak_memory_bytes")
    strip = lambda h: [{k: v for k, v in m.items() if k not in measured} for m in h]  # noqa: E731
    assert_near(strip(now["history"]), strip(old["history"]), "history")
    recipe = load_recipe(OLD_RUN / "recipe.toml", [], registries)
    Trainer(recipe, tmp_path / "restored", log=open(os.devnull, "w")).load_state(old)


def test_a_run_written_before_the_refactor_resumes(tmp_path, capsys):
    import shutil

    run = tmp_path / "old"
    shutil.copytree(OLD_RUN, run)
    assert main(["train", "--resume", str(run), "--set", "run.epochs=2", "--force"]) == 0
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2] and (run / "model.pt").exists()

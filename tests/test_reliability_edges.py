"""The edges around a run: forced resumes that apply what they say, evaluations that use the
data the run trained on, files that are not what they claim (FIFOs, devices, 16-bit images, one
class), third-party plugins that fail or print, wrong API arguments, colliding sweeps, and the
environment (stale distributed variables, resource limits, ``~``, ASCII locales, a full stdout).

A test that met a hang before the fix cannot hang the suite: FIFOs are fed by a watchdog after
a few seconds, and commands that could wait run in a subprocess or a thread with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from PIL import Image

import contsup
from contsup import hookimpl
from contsup.cli import main
from contsup.errors import ContsupError
from contsup.training.checkpoint import checkpoint_paths
from contsup.training.progress import Progress
from contsup.training.rundir import read_metrics

from conftest import ROOT
from test_plugins import FakeDist, FakeEntryPoint
from tiny import one_thread, tiny_recipe_text  # noqa: F401 (fixture)


# -- helpers --------------------------------------------------------------------------------


def _signal_at(monkeypatch, global_step: int) -> None:
    original = Progress.update
    count = {"n": 0}

    def update(self, step, losses):
        count["n"] += 1
        if count["n"] == global_step:
            os.kill(os.getpid(), signal.SIGINT)
        original(self, step, losses)

    monkeypatch.setattr(Progress, "update", update)


def _stopped(write_recipe, tmp_path, monkeypatch, capsys, step: int, name: str = "run", epochs: int = 3, extra: str = "") -> Path:
    """A run of ``epochs`` epochs of 4 steps, stopped with Ctrl-C after global step ``step``."""
    run = tmp_path / name
    path = write_recipe(tiny_recipe_text(run, epochs=epochs, extra=extra), f"{name}.toml")
    with monkeypatch.context() as m:
        _signal_at(m, step)
        assert main(["train", str(path)]) == 130
    capsys.readouterr()
    return run


def _finished(write_recipe, tmp_path, capsys, name: str = "done", epochs: int = 1, extra: str = "") -> Path:
    run = tmp_path / name
    assert main(["train", str(write_recipe(tiny_recipe_text(run, epochs=epochs, extra=extra), f"{name}.toml"))]) == 0
    capsys.readouterr()
    return run


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


@contextlib.contextmanager
def _memory_cap(extra: int = 4 << 30):
    """At most ``extra`` more bytes of address space for this process while inside: a reader
    that would read /dev/zero or a sparse 3 GB file whole meets a MemoryError, not the machine's
    out-of-memory killer (what such a test met before the fix)."""
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = size + extra if hard == resource.RLIM_INFINITY else min(hard, size + extra)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _newest_state(run: Path) -> dict:
    return torch.load(checkpoint_paths(run)[-1], map_location="cpu", weights_only=True)


# -- 1. a forced resume applies what it says, or changes nothing ------------------------------


def test_a_forced_resume_trains_with_the_new_lr_and_weight_decay(write_recipe, tmp_path, monkeypatch, capsys):
    """Before, the warning named both changes and recipe.toml was rewritten, but the restored
    optimizer and schedule states put the old lr and weight decay back."""
    reference = _finished(write_recipe, tmp_path, capsys, name="reference", epochs=3)
    run = _stopped(write_recipe, tmp_path, monkeypatch, capsys, step=4)  # at the end of epoch 1
    assert main(["train", "--resume", str(run), "--force", "--set", "optimizer.lr=0.5",
                 "--set", "optimizer.weight_decay=0.01"]) == 0
    err = capsys.readouterr().err
    assert "optimizer.lr (0.05 -> 0.5), optimizer.weight_decay (0.0001 -> 0.01)" in err
    groups = [g for o in _newest_state(run)["optimizers"] for g in o["param_groups"]]
    assert {g["weight_decay"] for g in groups} == {0.01} and {g["initial_lr"] for g in groups} == {0.5}
    lrs, ref = [m["lr"] for m in read_metrics(run)], [m["lr"] for m in read_metrics(reference)]
    assert lrs[1] == pytest.approx(10 * ref[1], rel=1e-6)  # epoch 2 at the schedule of lr 0.5


def test_a_forced_resume_mid_epoch_applies_the_new_lr_from_its_next_step(write_recipe, tmp_path, monkeypatch, capsys):
    reference = _finished(write_recipe, tmp_path, capsys, name="reference", epochs=3)
    run = _stopped(write_recipe, tmp_path, monkeypatch, capsys, step=6)  # epoch 2, after step 2 of 4
    assert main(["train", "--resume", str(run), "--force", "--set", "optimizer.lr=0.5"]) == 0
    assert read_metrics(run)[1]["lr"] == pytest.approx(10 * read_metrics(reference)[1]["lr"], rel=1e-6)


def test_a_refused_forced_resume_writes_nothing_and_the_run_still_resumes(write_recipe, tmp_path, monkeypatch, capsys):
    """Before, recipe.toml was rewritten first, then the checkpoint refused: the run could no
    longer be resumed or evaluated."""
    run = _stopped(write_recipe, tmp_path, monkeypatch, capsys, step=6)
    before = _snapshot(run)
    assert main(["train", "--resume", str(run), "--force", "--set", "partition.modules=2"]) == 2
    [line] = _errors(capsys)
    assert line.startswith(f"error: --resume {run}: --force cannot apply partition.modules (3 -> 2): the checkpoint "
                           f"cannot be restored into this run")
    assert line.endswith("nothing in the run directory was changed")
    assert _snapshot(run) == before
    assert main(["train", "--resume", str(run)]) == 0


@pytest.mark.parametrize("key, value", [("run.seed", "5"), ("run.epochs", "1")])
def test_a_forced_resume_refuses_what_it_cannot_apply(write_recipe, tmp_path, monkeypatch, capsys, key, value):
    """run.seed: the checkpoint's random states go on. run.epochs = 1 on a run stopped inside
    epoch 2: before, it exited 0 with model.pt holding mid-epoch-2 weights while metrics.jsonl
    said one epoch."""
    run = _stopped(write_recipe, tmp_path, monkeypatch, capsys, step=6)
    before = _snapshot(run)
    assert main(["train", "--resume", str(run), "--force", "--set", f"{key}={value}"]) == 2
    [line] = _errors(capsys)
    assert key in line and "nothing was changed" in line
    assert _snapshot(run) == before and not (run / "model.pt").exists()


def test_truncating_epochs_at_an_epochs_end_writes_that_epochs_weights(write_recipe, tmp_path, monkeypatch, capsys):
    run = _stopped(write_recipe, tmp_path, monkeypatch, capsys, step=4)
    weights = _newest_state(run)["model"]
    assert main(["train", "--resume", str(run), "--force", "--set", "run.epochs=1"]) == 0
    model = torch.load(run / "model.pt", weights_only=True)
    assert [m["epoch"] for m in read_metrics(run)] == [1]
    assert all(torch.equal(model[k], weights[k]) for k in weights)


# -- 2. a run remembers what it was trained on ------------------------------------------------


def test_eval_refuses_a_recipe_toml_edited_after_the_run(write_recipe, tmp_path, capsys):
    run = _finished(write_recipe, tmp_path, capsys)
    assert (run / "recipe.toml.sha256").is_file()
    text = (run / "recipe.toml").read_text()
    (run / "recipe.toml").write_text(text.replace("test_size = 16", "test_size = 8"))
    assert main(["eval", str(run)]) == 2
    assert _errors(capsys) == [
        f"error: {run / 'recipe.toml'}: not the recipe the run trained with (it was edited after the run wrote it, as "
        f"recipe.toml.sha256 shows); put the run's own back (every checkpoint holds it), or keep it and evaluate other "
        f"data with --data KEY=VALUE"
    ]
    with pytest.raises(ContsupError, match="not the recipe the run trained with"):
        contsup.load_model(run)


def _images(root: Path, classes: tuple[str, ...], seed: int, n: int = 4, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


IMAGES = """
[run]
epochs = 1
out_dir = "{out}"

[data]
use = "imagefolder"
root = "{root}"
size = 8
augment = "none"
batch_size = 4

[backbone]
use = "cifar_resnet20"

[partition]
modules = 2

[optimizer]
lr = 0.05
"""


def test_a_relative_data_root_is_recorded_absolute_so_eval_reads_the_same_images_anywhere(tmp_path, monkeypatch, capsys):
    """Before, ``cd elsewhere && contsup eval RUN`` read elsewhere/imgs: other data, no word."""
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    _images(home / "imgs", ("a", "b"), seed=0)
    _images(elsewhere / "imgs", ("a", "b"), seed=1)
    (home / "r.toml").write_text(IMAGES.format(out="run", root="imgs"))
    monkeypatch.chdir(home)
    assert main(["train", "r.toml"]) == 0
    assert contsup.load_recipe(home / "run" / "recipe.toml").dataset.options.root == str(home / "imgs")
    here = contsup.evaluate(home / "run")
    monkeypatch.chdir(elsewhere)
    assert contsup.evaluate(home / "run")["test_error_pct"] == here["test_error_pct"]
    capsys.readouterr()


def test_eval_on_data_with_other_class_names_is_refused(tmp_path, capsys):
    """Before, ``eval --data root=OTHER`` reported an error rate without looking at classes.json."""
    _images(tmp_path / "imgs", ("a", "b"), seed=0)
    _images(tmp_path / "other", ("a", "c"), seed=1)
    _images(tmp_path / "same", ("a", "b"), seed=2)
    (tmp_path / "r.toml").write_text(IMAGES.format(out=tmp_path / "run", root=tmp_path / "imgs"))
    assert main(["train", str(tmp_path / "r.toml")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--data", f"root={tmp_path / 'other'}"]) == 2
    [line] = _errors(capsys)
    assert "has the classes ['a', 'c'], the run was trained on ['a', 'b'] (classes.json)" in line
    assert main(["eval", str(tmp_path / "run"), "--data", f"root={tmp_path / 'same'}"]) == 0


def test_evaluate_with_data_of_another_shape_is_one_line(write_recipe, tmp_path, capsys):
    """Before, the weights loaded (convolutions take any image size) and an error rate came out."""
    run = _finished(write_recipe, tmp_path, capsys)
    with pytest.raises(ContsupError) as err:
        contsup.evaluate(run, data=["shape=[3,16,16]"])
    assert err.value.lines == (f"{run}: the data of --data shape=[3,16,16] gives inputs of shape (3, 16, 16), the run's "
                               f"network takes (3, 8, 8); evaluate it on data of the run's input shape and classes",)
    with pytest.raises(ContsupError, match="the saved weights do not fit the network for this"):
        contsup.evaluate(run, data=["classes=5"])


def test_results_tell_runs_on_different_data_roots_apart(tmp_path, capsys):
    """Before, two image-folder runs on different roots were one row of the table."""
    for name in ("x", "y"):
        _images(tmp_path / name, ("a", "b"), seed=ord(name))
        (tmp_path / f"{name}.toml").write_text(IMAGES.format(out=tmp_path / "runs" / name, root=tmp_path / name))
        assert main(["train", str(tmp_path / f"{name}.toml")]) == 0
    capsys.readouterr()
    assert main(["results", str(tmp_path / "runs")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| imagefolder")]
    assert len(rows) == 2 and all(" 1 |" in row for row in rows)


# -- 3. inputs that are what they claim -----------------------------------------------------


def _without_hanging(call, fifos: list[Path], seconds: float = 20.0):
    """``call()`` in a thread; if it is still running after ``seconds`` (blocked opening a FIFO),
    a writer opens and closes every FIFO so the reader sees an empty file and the call ends:
    returns (its result, whether it had to be unblocked)."""
    result: dict = {}

    def target():
        try:
            result["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    blocked = thread.is_alive()
    for _ in range(50):
        if not thread.is_alive():
            break
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        thread.join(0.2)
    if "error" in result:
        raise result["error"]
    return result.get("value"), blocked


@pytest.mark.parametrize("target, command", [
    ("recipe", lambda run, d: ["validate", str(d / "fifo.toml")]),
    ("extends", lambda run, d: ["validate", str(d / "child.toml")]),
    ("metrics.jsonl", lambda run, d: ["results", str(run)]),
    ("recipe.toml", lambda run, d: ["eval", str(run)]),
    ("model.pt", lambda run, d: ["eval", str(run)]),
])
def test_a_fifo_where_a_file_belongs_is_one_line_not_a_hang(write_recipe, tmp_path, capsys, target, command):
    """Before, reading a FIFO waited for a writer that never came."""
    run = _finished(write_recipe, tmp_path, capsys)
    if target == "recipe":
        fifo = tmp_path / "fifo.toml"
    elif target == "extends":
        fifo = tmp_path / "base.toml"
        (tmp_path / "child.toml").write_text('extends = "base.toml"\n')
    else:
        fifo = run / target
        fifo.unlink()
    os.mkfifo(fifo)
    code, blocked = _without_hanging(lambda: main(command(run, tmp_path)), [fifo])
    assert not blocked, f"contsup {' '.join(command(run, tmp_path))} waited on the FIFO {fifo}"
    assert code == 2
    lines = _errors(capsys)
    assert len(lines) == 1 and str(fifo) in lines[0] and "FIFO" in lines[0]


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_device_as_the_recipe_is_one_line(capsys, device):
    """Before, validate /dev/zero read until a MemoryError."""
    with _memory_cap():
        assert main(["validate", device]) == 2
    assert _errors(capsys) == [f"error: {device}: cannot read: it is a character device, not a file"]


def test_a_huge_recipe_is_refused_unread(tmp_path, capsys):
    path = tmp_path / "huge.toml"
    with open(path, "wb") as f:
        f.truncate(3 << 30)  # sparse: no disk used
    with _memory_cap():
        assert main(["validate", str(path)]) == 2
    assert _errors(capsys) == [f"error: {path}: cannot read: it holds 3,072 MB, more than a recipe can (16 MB)"]


def test_16_bit_images_reach_the_network_as_their_8_bit_values(tmp_path):
    """Before, PIL's conversion clipped every value above 255 to white."""
    from contsup_datasets.imagefolder import read_image

    values = np.arange(64, dtype=np.uint16).reshape(8, 8) * 4
    Image.fromarray(values * 257).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    rgb = np.asarray(read_image(str(tmp_path / "deep.png")))
    assert rgb.shape == (8, 8, 3) and (rgb[..., 0] == values).all()
    Image.fromarray((values * 1000).astype(np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(ContsupError, match=r"wide.tif: image mode I \(32-bit integer pixels\) has no fixed range"):
        read_image(str(tmp_path / "wide.tif"))


def test_one_class_folder_is_refused_before_training(tmp_path, capsys):
    """Before, it trained and reported 0.00 % error."""
    _images(tmp_path / "imgs", ("only",), seed=0)
    (tmp_path / "r.toml").write_text(IMAGES.format(out=tmp_path / "run", root=tmp_path / "imgs"))
    assert main(["train", str(tmp_path / "r.toml")]) == 2
    assert _errors(capsys) == [
        f"error: {tmp_path / 'r.toml'}: imagefolder: {tmp_path / 'imgs' / 'train'} holds one class folder (only); a "
        f"classifier needs two or more classes: add a class folder to both train/ and val/"
    ]
    assert not (tmp_path / "run").exists()


# -- 4. plugin failures name the plugin ------------------------------------------------------


def evil_module(name: str, behaviour: str) -> types.ModuleType:
    """A third-party plugin whose components misbehave as ``behaviour`` says."""
    from torch import nn

    from contsup.types import DatasetInfo, Source

    module = types.ModuleType(name)

    def bad(what: str) -> bool:
        return behaviour == what

    class EvilSel:
        name = "evilsel"

        @attrs.frozen
        class Options:
            pass

        def __init__(self, options):
            self.options = options

        def sources(self, module, num_modules):
            if bad("sources:raise"):
                raise RuntimeError("selector exploded")
            if bad("sources:none"):
                return None
            return (Source.input(),) if module > 1 else ()

        def adapter(self, source, source_shape, target_shape):
            if bad("adapter:broadcast"):  # (B, C, 1, 1): added everywhere alike, silently
                return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(source_shape[0], target_shape[0], 1))
            return None

    class Items(torch.utils.data.Dataset):
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            y = 10 if bad("item:label10") and i == 5 else i % 10
            return torch.full((3, 8, 8), 0.1 * (i % 10)), y

    class EvilData:
        name = "evildata"

        @attrs.frozen
        class Options:
            pass

        def __init__(self, options):
            self.options = options

        def info(self):
            if bad("info:raise"):
                raise RuntimeError("info exploded")
            return DatasetInfo(input_shape=(3, 8, 8), num_classes=10, mean=(0.0,) * 3, std=(1.0,) * 3)

        def load(self, train):
            return Items(0 if bad("empty:train") and train else (32 if train else 16))

    @hookimpl
    def register_context_selectors(register):
        register(EvilSel)

    @hookimpl
    def register_datasets(register):
        register(EvilData)

    module.register_context_selectors = register_context_selectors
    module.register_datasets = register_datasets
    return module


@pytest.fixture
def evil(monkeypatch):
    """Install the plugin ``evil`` (distribution contsup-evil 0.1) with a behaviour, through a
    faked entry point; returns a function taking the behaviour."""
    import importlib.metadata

    real = importlib.metadata.entry_points
    points: list = []

    def entry_points(group=None, **kwargs):
        if group != "contsup":
            return real(**({"group": group} if group else {}), **kwargs)
        return list(points)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.delenv("CONTSUP_LOAD_PLUGINS", raising=False)

    def install(behaviour: str = "", module: types.ModuleType | None = None, value: str = "") -> None:
        value = value or f"evil_{abs(hash(behaviour))}"
        if module is None:
            module = evil_module(value, behaviour)
        if module is not False:
            monkeypatch.setitem(sys.modules, value, module)
        points.append(FakeEntryPoint("evil", value, FakeDist("contsup-evil", "0.1")))

    return install


def _evil_recipe(write_recipe, tmp_path, table: str) -> Path:
    text = tiny_recipe_text(tmp_path / "run", epochs=1)
    if table == "context":
        text = text.replace('use = "R1E"', 'use = "evilsel"')
    else:
        text = text.replace('use = "synthetic"\nshape = [3, 8, 8]\ntrain_size = 32\ntest_size = 16\n', 'use = "evildata"\n')
        assert "evildata" in text
    return write_recipe(text, "evil.toml")


@pytest.mark.parametrize("behaviour, table, expected", [
    ("sources:raise", "context", "context selector 'evilsel' of plugin 'evil' (contsup-evil 0.1): sources(1, 3) raised "
                                 "RuntimeError: selector exploded"),
    ("sources:none", "context", "context selector 'evilsel' of plugin 'evil' (contsup-evil 0.1): sources(1, 3) returned "
                                "None; expected a tuple of contsup.types.Source"),
    ("adapter:broadcast", "context", "context selector 'evilsel' of plugin 'evil' (contsup-evil 0.1): adapter(<Source>, "
                                     "(3, 8, 8), (16, 8, 8)) returned a module mapping (2, 3, 8, 8) to (2, 16, 1, 1); "
                                     "expected a module giving (2, 16, 8, 8), the shape of the input it is added to"),
    ("item:label10", "data", "dataset 'evildata' of plugin 'evil' (contsup-evil 0.1): item 5 of its training set has the "
                             "label 10, outside 0..9 (its info() gives 10 classes)"),
    ("empty:train", "data", "dataset 'evildata' of plugin 'evil' (contsup-evil 0.1) has no training images"),
    ("info:raise", "data", "dataset 'evildata' of plugin 'evil' (contsup-evil 0.1): info() raised RuntimeError: info "
                           "exploded"),
])
def test_a_failing_third_party_component_is_one_line_naming_the_plugin(evil, write_recipe, tmp_path, capsys, behaviour, table, expected):
    """Before, each was a raw traceback that did not name the plugin (or, for an adapter of the
    wrong shape, a silent broadcast)."""
    evil(behaviour)
    path = _evil_recipe(write_recipe, tmp_path, table)
    code = main(["train", str(path)])
    lines = _errors(capsys)
    assert code in (1, 2) and len(lines) == 1, lines
    assert expected in lines[0]
    if "item" not in behaviour:
        assert not (tmp_path / "run").exists()


def evil_method_and_logger(name: str, behaviour: str) -> types.ModuleType:
    """A third-party plugin with a training method ``evilmeth`` and a logger ``evillog`` that
    misbehave as ``behaviour`` says."""
    module = types.ModuleType(name)

    class EvilMethod:
        name = "evilmeth"

        @attrs.frozen
        class Options:
            pass

        def __init__(self, options):
            self.options = options

        def active(self):
            return True

        def link(self, module, num_modules, units):
            return -1 if behaviour == "link:negative" else 0

        def after_step(self, module, network):
            if behaviour == "after_step:raise":
                raise RuntimeError("method exploded")

    class EvilLogger:
        name = "evillog"

        @attrs.frozen
        class Options:
            pass

        def __init__(self, options):
            self.options = options

        def on_run_start(self, run):
            if behaviour == "logger:exit":
                sys.exit(3)

        def on_epoch_end(self, run, epoch, metrics):
            pass

        def on_run_end(self, run, metrics):
            pass

    @hookimpl
    def register_methods(register):
        register(EvilMethod)

    @hookimpl
    def register_loggers(register):
        register(EvilLogger)

    module.register_methods = register_methods
    module.register_loggers = register_loggers
    return module


@pytest.mark.parametrize("behaviour, table, expected", [
    ("link:negative", "[evilmeth]\n", "training method 'evilmeth' of plugin 'evil' (contsup-evil 0.1): link(1, 3, "),
    ("after_step:raise", "[evilmeth]\n", "training method 'evilmeth' of plugin 'evil' (contsup-evil 0.1): after_step(<ContextModule>, "
                                         "<GreedyNetwork>) raised RuntimeError: method exploded"),
    ("logger:exit", "[log]\nuse = [\"evillog\"]\n", "log.use: the evillog logger cannot start (it called sys.exit(3))"),
])
def test_a_failing_third_party_method_or_logger_is_one_line_naming_the_plugin(evil, write_recipe, tmp_path, capsys, behaviour, table, expected):
    """Training methods are guarded as the other components are (a method's exception was a raw
    traceback); a logger calling sys.exit ended the command without a word, and is now said as a
    logger that cannot start."""
    evil(module=evil_method_and_logger(f"evil_m_{abs(hash(behaviour))}", behaviour), value=f"evil_m_{abs(hash(behaviour))}")
    text = tiny_recipe_text(tmp_path / "run", epochs=1)
    if table.startswith("[log]"):
        text = text.replace("[log]\n", "[log]\nuse = [\"evillog\"]\n") if "[log]" in text else text + "\n" + table
    else:
        text += "\n" + table
    code = main(["train", str(write_recipe(text, "evil.toml"))])
    lines = _errors(capsys)
    assert code in (1, 2) and len(lines) == 1, lines
    assert expected in lines[0], lines[0]


def test_a_plugin_printing_at_import_leaves_json_on_stdout(evil, write_recipe, tmp_path, capsys, monkeypatch):
    """Before, ``plan --json`` printed the plugin's line before the JSON, exit 0."""
    (tmp_path / "evil_printing.py").write_text(
        "import os\nprint('evil plugin loaded')\nos.write(1, b'and at the file descriptor\\n')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "evil_printing", raising=False)
    evil(module=False, value="evil_printing")
    path = write_recipe(tiny_recipe_text(tmp_path / "run"), "plain.toml")
    assert main(["plan", str(path), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["backbone"] == "cifar_resnet20"
    assert "evil plugin loaded" in out.err


def test_a_plugin_calling_sys_exit_at_import_is_left_out_with_one_line(evil, write_recipe, tmp_path, capsys, monkeypatch):
    """Before, validate ended silently with the plugin's exit status 3."""
    (tmp_path / "evil_exiting.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "evil_exiting", raising=False)
    evil(module=False, value="evil_exiting")
    path = write_recipe(tiny_recipe_text(tmp_path / "run"), "plain.toml")
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr()
    assert f"{path}: ok" in out.out
    assert ("warning: Error loading plugin 'evil' (entry point evil_exiting): it called sys.exit(3) while loading "
            "(skip it with CONTSUP_LOAD_PLUGINS naming the plugins to load, or uninstall contsup-evil)") in out.err.splitlines()


# -- 5. the API checks its arguments ---------------------------------------------------------


@pytest.mark.parametrize("call, expected", [
    (lambda r: contsup.train(123), "contsup.train: recipe must be a path (a string or a pathlib.Path) or a recipe from "
                                   "contsup.load_recipe, got int 123"),
    (lambda r: contsup.train({"run": {"epochs": 1}}), "contsup.train: recipe must be a path"),
    (lambda r: contsup.train(r, overrides="run.epochs=1"), "contsup.train: overrides must be a list of 'key.path=value' "
                                                           "strings, got the string 'run.epochs=1'; wrap it in a list: "
                                                           "['run.epochs=1']"),
    (lambda r: contsup.train(r, overrides=[1]), "contsup.train: overrides must be a list of 'key.path=value' strings, but "
                                                "it holds int 1"),
    (lambda r: contsup.train(r, out_dir=123), "contsup.train: out_dir must be a path"),
    (lambda r: contsup.load_recipe(None), "contsup.load_recipe: path must be a path"),
    (lambda r: contsup.evaluate(r, data="root=x"), "contsup.evaluate: data must be a list of 'key=value' strings"),
    (lambda r: contsup.evaluate(torch.nn.Linear(2, 2)), "contsup.evaluate(network, ...) needs the recipe"),
    (lambda r: contsup.load_model(None), "contsup.load_model: run_dir must be a path"),
])
def test_wrong_api_arguments_are_one_contsup_error(write_recipe, tmp_path, call, expected):
    """Before: TypeError tracebacks, one complaint per character of a string, or a run trained
    into a folder named 123."""
    recipe = write_recipe(tiny_recipe_text(tmp_path / "run", epochs=1))
    with pytest.raises(ContsupError) as err:
        call(recipe)
    assert len(err.value.lines) == 1 and err.value.lines[0].startswith(expected)
    assert not (tmp_path / "run").exists() and not Path("123").exists()


def test_overrides_none_means_no_overrides(write_recipe, tmp_path):
    recipe = write_recipe(tiny_recipe_text(tmp_path / "run", epochs=1))
    assert contsup.load_recipe(recipe, overrides=None).run.epochs == 1


# -- 6. sweeps -----------------------------------------------------------------------------


def _sweep(tmp_path: Path, recipes: list[str], axes: str, out: str = "") -> Path:
    path = tmp_path / "s.sweep.toml"
    path.write_text(f"[sweep]\nrecipes = {json.dumps(recipes)}\nout_dir = \"{out or tmp_path / 'sw'}\"\n\n[axes]\n{axes}\n")
    return path


@pytest.mark.parametrize("kind", ["repeated value", "two recipes of one name", "values that read alike"])
def test_sweep_points_colliding_on_a_run_directory_are_refused_before_anything_trains(tmp_path, capsys, kind):
    """Before, the second point found the first's run finished and was counted without training."""
    base = tiny_recipe_text("", epochs=1)
    (tmp_path / "base.toml").write_text(base)
    if kind == "repeated value":
        sweep = _sweep(tmp_path, ["base.toml"], '"run.seed" = [4, 4]')
        both = "[run.seed=4] and [run.seed=4]"
    elif kind == "two recipes of one name":
        for d in ("a", "b"):
            (tmp_path / d).mkdir()
            (tmp_path / d / "base.toml").write_text(base)
        sweep = _sweep(tmp_path, ["a/base.toml", "b/base.toml"], '"run.seed" = [0]')
        both = f"[recipe {tmp_path / 'a' / 'base.toml'} run.seed=0] and [recipe {tmp_path / 'b' / 'base.toml'} run.seed=0]"
    else:  # both become the folder name data.root=imgs-v1
        _images(tmp_path / "imgs" / "v1", ("a", "b"), seed=0)
        _images(tmp_path / "imgs-v1", ("a", "b"), seed=1)
        (tmp_path / "base.toml").write_text(IMAGES.format(out="", root="x").replace('out_dir = ""\n', ""))
        sweep = _sweep(tmp_path, ["base.toml"], f'"data.root" = ["{tmp_path}/imgs/v1", "{tmp_path}/imgs-v1"]')
        both = f'[data.root="{tmp_path}/imgs/v1"] and [data.root="{tmp_path}/imgs-v1"]'
    assert main(["sweep", str(sweep)]) == 2
    [line] = _errors(capsys)
    assert both in line and "would train into the same run directory" in line
    assert not (tmp_path / "sw").exists()


def test_a_sweep_rerun_after_its_base_recipe_changed_is_refused(tmp_path, capsys):
    """Before, the finished runs were skipped: the table then mixed two experiments."""
    (tmp_path / "base.toml").write_text(tiny_recipe_text("", epochs=1))
    sweep = _sweep(tmp_path, ["base.toml"], '"run.seed" = [0]')
    assert main(["sweep", str(sweep)]) == 0
    (tmp_path / "base.toml").write_text(tiny_recipe_text("", epochs=1).replace("lr = 0.05", "lr = 0.2"))
    capsys.readouterr()
    before = _snapshot(tmp_path / "sw")
    assert main(["sweep", str(sweep)]) == 2
    [line] = _errors(capsys)
    assert "was trained with another recipe than its combination [run.seed=0] gives now (optimizer.lr (0.05 -> 0.2))" in line
    assert _snapshot(tmp_path / "sw") == before


# -- 7. environment ------------------------------------------------------------------------


def test_stale_distributed_variables_are_named_within_seconds(write_recipe, tmp_path, capsys, monkeypatch):
    """Before, WORLD_SIZE=2 RANK=0 with a MASTER_PORT left in the shell waited ten minutes in
    silence (a thread with a deadline keeps such a wait from holding the suite)."""
    from contsup.distributed import launch

    monkeypatch.setattr(launch, "JOIN_WARN_S", 0.5, raising=False)
    monkeypatch.setattr(launch, "JOIN_TIMEOUT_S", 2.0, raising=False)
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(name, value)
    path = write_recipe(tiny_recipe_text(tmp_path / "run", epochs=1))
    started = time.monotonic()
    code, blocked = _without_hanging(lambda: main(["train", str(path)]), [], seconds=60)
    assert not blocked and time.monotonic() - started < 30
    assert code == 2
    [line] = _errors(capsys)
    assert "WORLD_SIZE=2, RANK=0" in line and "not started by torchrun" in line and "unset them" in line


def _command(args: list[str], tmp_path: Path, timeout: float = 240, env: dict | None = None, limits=None,
             stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    """``python -m contsup ARGS`` in a subprocess with a deadline (what a process-wide setting needs)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("WORLD_SIZE", "RANK", "MASTER_"))}
    environ.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", **(env or {}))

    def apply():
        for kind, value in (limits or {}).items():
            resource.setrlimit(kind, (value, value))

    return subprocess.run([sys.executable, "-m", "contsup", *args], cwd=tmp_path, env=environ, timeout=timeout,
                          stdout=stdout, stderr=subprocess.PIPE, text=True, preexec_fn=apply)


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_low_open_file_limit_with_data_workers_is_one_line(write_recipe, tmp_path):
    """Before, the workers failed with EMFILE tracebacks (or the run hung)."""
    path = write_recipe(tiny_recipe_text(tmp_path / "run", epochs=1, extra="").replace("batch_size = 8", "batch_size = 8\nworkers = 2"))
    done = _command(["train", str(path)], tmp_path, limits={resource.RLIMIT_NOFILE: 20})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    [line] = _lines(done.stderr)
    assert line.startswith("error: data.workers = 2 needs about") and "(ulimit -n)" in line
    assert not (tmp_path / "run").exists()


def test_ensure_open_files_raises_the_soft_limit_where_the_hard_one_allows(monkeypatch):
    from contsup.training import loaders

    calls = []
    monkeypatch.setattr(loaders.resource, "getrlimit", lambda kind: (32, 100_000))
    monkeypatch.setattr(loaders.resource, "setrlimit", lambda kind, limits: calls.append(limits))
    loaders.ensure_open_files(4)
    assert calls and calls[0][0] >= 32 + 4 * loaders.FILES_PER_WORKER and calls[0][1] == 100_000


def test_a_file_size_limit_is_one_line_and_the_run_resumes_once_lifted(write_recipe, tmp_path):
    """Before, SIGXFSZ ended the process mid-write: a run directory neither a rerun nor
    --resume could use."""
    path = write_recipe(tiny_recipe_text(tmp_path / "run", epochs=1))
    done = _command(["train", str(path)], tmp_path, limits={resource.RLIMIT_FSIZE: 100 * 1024})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    [line] = _lines(done.stderr)
    assert "(File too large)" in line and "ulimit -f" in line
    again = (["train", "--resume", str(tmp_path / "run")] if (tmp_path / "run").exists() else ["train", str(path)])
    assert _command(again, tmp_path).returncode == 0
    assert (tmp_path / "run" / "model.pt").is_file()


def test_a_full_stdout_does_not_stop_a_run(write_recipe, tmp_path):
    path = write_recipe(tiny_recipe_text(tmp_path / "run", epochs=1))
    with open("/dev/full", "w") as full:
        done = _command(["train", str(path)], tmp_path, stdout=full)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "warning: standard output cannot be written (No space left on device)" in done.stderr
    assert (tmp_path / "run" / "model.pt").is_file()
    with open("/dev/full", "w") as full:
        done = _command(["validate", str(path)], tmp_path, stdout=full)
    assert done.returncode == 1 and _lines(done.stderr) == [
        "error: cannot write standard output (No space left on device); what the command printed is lost"]


def test_a_non_ascii_recipe_name_under_an_ascii_locale(tmp_path):
    """Before, printing the path ended the run in a UnicodeEncodeError traceback. A file name
    the process cannot write at all (é in out_dir, file names in ASCII) is one line."""
    ascii_locale = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}
    path = tmp_path / "réglage.toml"
    path.write_text(tiny_recipe_text(tmp_path / "run", epochs=1), encoding="utf-8")
    done = _command(["train", str(path)], tmp_path, env=ascii_locale)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert (tmp_path / "run" / "model.pt").is_file()
    assert "r\\udcc3\\udca9glage.toml" in done.stdout  # its bytes, escaped
    path.write_text(tiny_recipe_text(tmp_path / "runs-é", epochs=1), encoding="utf-8")
    done = _command(["train", str(path)], tmp_path, env=ascii_locale)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    [line] = _lines(done.stderr)
    assert "runs-\\xe9" in line and "PYTHONUTF8=1" in line


def test_a_tilde_in_out_dir_is_the_home_folder(write_recipe, tmp_path, monkeypatch, capsys):
    """Before, out_dir = "~/runs/x" wrote into a folder literally named ~."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tiny_recipe_text("~/runs/x", epochs=1))
    assert main(["train", str(path)]) == 0
    assert (tmp_path / "home" / "runs" / "x" / "model.pt").is_file() and not (tmp_path / "~").exists()
    assert main(["eval", "~/runs/x"]) == 0


@pytest.mark.parametrize("args", [["results", "RUN", "--csv", "NO/x.csv"], ["results", "RUN", "--markdown", "NO/x.md"],
                                  ["report", "RUN", "-o", "FILE/report"]])
def test_a_path_that_cannot_be_used_exits_2(write_recipe, tmp_path, capsys, args):
    """docs/runs.md: bad input exits 2; these exited 1."""
    run = _finished(write_recipe, tmp_path, capsys)
    (tmp_path / "FILE").write_text("x")
    argv = [a.replace("RUN", str(run)).replace("NO", str(tmp_path / "no")).replace("FILE", str(tmp_path / "FILE")) for a in args]
    assert main(argv) == 2
    assert len(_errors(capsys)) == 1


# -- 8. generated bad inputs: no traceback, exit 2 (or 1), no file of an existing run changed --

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ODD = ("fifo", "/dev/zero", "/dev/null", "directory", "missing", "bytes", "huge", "run")
# what a command line can carry: printable text without NUL (argv cannot hold one)
ARG = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=24)


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory):
    """One finished run that every generated input is pointed at, and must leave as it was."""
    root = tmp_path_factory.mktemp("existing")
    path = root / "done.toml"
    path.write_text(tiny_recipe_text(root / "done", epochs=1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "done"


def _odd(kind: str, where: Path, run: Path, data: bytes) -> Path:
    """A path of ``kind``: a FIFO, a device, a folder, nothing, random bytes, a sparse 3 GB file or the run."""
    if kind.startswith("/dev/"):
        return Path(kind)
    if kind == "run":
        return run
    path = where / f"odd-{kind}-{time.monotonic_ns()}.toml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "bytes":
        path.write_bytes(data)
    elif kind == "huge":
        with open(path, "wb") as f:
            f.write(data[:64])
            f.truncate(3 << 30)
    return path


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(command=st.sampled_from(["validate", "plan", "eval", "results", "resume", "train"]), kind=st.sampled_from(ODD),
       data=st.binary(max_size=200), sets=st.lists(st.tuples(ARG, ARG), max_size=2), json_out=st.booleans())
def test_generated_bad_command_lines(existing_run, tmp_path_factory, capsys, command, kind, data, sets, json_out):
    where = tmp_path_factory.mktemp("cli")
    before = _snapshot(existing_run)
    target = _odd(kind, where, existing_run, data)
    argv = {"validate": ["validate", str(target)], "plan": ["plan", str(target)], "eval": ["eval", str(target)],
            "results": ["results", str(target)], "resume": ["train", "--resume", str(target)],
            "train": ["train", str(target)]}[command]
    option = "--data" if command == "eval" else "--set"
    if command not in ("results",):
        argv += [a for key, value in sets for a in (option, f"{key}={value}")]
    if json_out and command in ("plan", "eval"):
        argv.append("--json")
    if command == "train" and kind == "run":
        argv = ["train", str(existing_run / "recipe.toml")]  # its out_dir exists: refused, never overwritten
    cwd = os.getcwd()
    os.chdir(where)  # anything a generated input makes lands here
    try:
        with _memory_cap():
            code, blocked = _without_hanging(lambda: main(argv), [target] if kind == "fifo" else [], seconds=20)
    finally:
        os.chdir(cwd)
    out = capsys.readouterr()
    assert not blocked, f"contsup {' '.join(argv)} waited on a FIFO"
    assert "Traceback" not in out.err
    assert _snapshot(existing_run) == before, f"contsup {' '.join(argv)} changed the existing run"
    assert code in ((0, 1, 2) if kind == "run" else (1, 2)), (argv, code, out.err[-500:])
    if code:
        lines = [line for line in out.err.splitlines() if line.strip() and not line.startswith(("warning:", "note:"))]
        assert lines and all(line.startswith("error: ") for line in lines), out.err[-1000:]
    if json_out and code == 0 and command in ("plan", "eval"):
        json.loads(out.out)


BAD = st.one_of(st.integers(), st.floats(allow_nan=True), st.binary(max_size=8), st.lists(st.integers(), max_size=3),
                st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.booleans(), st.just(""))
CALLS = {
    "train(recipe)": lambda r, run, v: contsup.train(v),
    "train(overrides)": lambda r, run, v: contsup.train(r, overrides=v),
    "train(out_dir)": lambda r, run, v: contsup.train(r, out_dir=v),
    "train(resume)": lambda r, run, v: contsup.train(resume=v),
    "load_recipe(path)": lambda r, run, v: contsup.load_recipe(v),
    "load_recipe(overrides)": lambda r, run, v: contsup.load_recipe(r, overrides=v),
    "build_network(recipe)": lambda r, run, v: contsup.build_network(v),
    "evaluate(run)": lambda r, run, v: contsup.evaluate(v),
    "evaluate(data)": lambda r, run, v: contsup.evaluate(run, data=v),
    "evaluate(device)": lambda r, run, v: contsup.evaluate(run, device=v),
    "load_model(run_dir)": lambda r, run, v: contsup.load_model(v),
    "load_model(map_location)": lambda r, run, v: contsup.load_model(run, map_location=v),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=st.sampled_from(sorted(CALLS)), value=BAD)
def test_generated_bad_api_arguments(existing_run, tmp_path_factory, call, value):
    """Every wrong argument is one ContsupError (the API's contract, printed as exit 2 by a
    caller), never another exception, and the existing run is left as it was."""
    where = tmp_path_factory.mktemp("api")
    recipe = where / "r.toml"
    recipe.write_text(tiny_recipe_text(where / "run", epochs=1))
    before = _snapshot(existing_run)
    try:
        CALLS[call](recipe, existing_run, value)
    except ContsupError as exc:
        assert exc.exit_code in (1, 2) and exc.lines and all("\n" not in line for line in exc.lines)
    else:  # accepted: only an empty list where a list of strings is expected
        assert value == [] and call in ("train(overrides)", "load_recipe(overrides)", "evaluate(data)"), (call, value)
    assert _snapshot(existing_run) == before
    assert not (where / "run").exists() or (call, value) == ("train(overrides)", [])

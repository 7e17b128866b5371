"""Attack the edges around a run, as users and plugin authors meet them in bad moments, and count
what held.

Usage::

    python benchmarks/attack_edges.py --out edges-out                 # every case (about 30 min on 2 cores)
    python benchmarks/attack_edges.py --out edges-out --only plugins,api
    python benchmarks/attack_edges.py --out edges-out --list          # the cases, without running them

Families: ``resume`` (``train --resume --force`` with changed keys), ``eval`` (edited recipes,
relative data roots, other class names), ``files`` (FIFOs, character devices, huge sparse files,
image modes, one-class folders), ``plugins`` (third-party selectors, adapters, objectives,
datasets, backbones, decoders and partitioners that raise or return the wrong thing, and
plugins that exit or print at import), ``api`` (wrong argument types), ``sweeps`` (colliding
run directories, a changed base recipe), ``env`` (stale distributed variables, resource limits,
``~`` in paths, non-ASCII names under an ASCII locale, a full or closed stdout) and ``exits``
(the exit status docs/runs.md promises).

Every case runs ``python -m contsup ...`` (or a short API script) in a subprocess of its own
session, with a time limit (``--timeout``, 90 s: a busy 2-core machine), on a tiny synthetic recipe (3x8x8 images,
ResNet-20 in 3 modules, 4 steps per epoch), and is classified:

- ``held``: it did what docs/runs.md says: a clear ``error:`` line (one per problem, naming
  what the case needs named; exactly one for a wrong API argument) with the documented exit
  status and no file of an existing run changed, or a correct result;
- ``traceback``: a Python traceback reached the user;
- ``unclear``: an error that does not say what is wrong (several lines, the wrong exit status,
  the key or plugin not named);
- ``silent``: a wrong result without a word (a changed run file, a setting not applied, other
  data evaluated, stdout that is not JSON, exit 0 for input that should be refused);
- ``hang``: the time limit passed (the process group is killed).

Writes ``OUT/edges.json`` (every case: family, name, command, exit, outcome, why, first lines of
stderr) and ``OUT/edges.md`` (the counts per family), and prints the table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = Path(__file__).resolve().parent / "attack_preload"
OUTCOMES = ("held", "traceback", "unclear", "silent", "hang")
FAMILIES = ("resume", "eval", "files", "plugins", "api", "sweeps", "env", "exits")
MEMORY_LIMIT = 6 << 30  # address space of every case (a shared machine)

TINY = """\
[run]
seed = 0
epochs = {epochs}
out_dir = "{out_dir}"
checkpoint_every_steps = {every}

[data]
use = "synthetic"
shape = [3, 8, 8]
train_size = 32
test_size = 16
batch_size = 8

[backbone]
use = "cifar_resnet20"

[partition]
modules = 3

[context]
use = "R1E"

[optimizer]
lr = 0.05
"""


def tiny(out_dir: Path | str, epochs: int = 3, every: int = 1, extra: str = "") -> str:
    return TINY.format(out_dir=out_dir, epochs=epochs, every=every) + extra


IMAGE_RECIPE = """\
[run]
seed = 0
epochs = 1
out_dir = "{out_dir}"

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

[context]
use = "R1E"

[optimizer]
lr = 0.05
"""


# -- running one command ------------------------------------------------------------------------


def base_env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("ATTACK_", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                                                                   "MASTER_", "TORCHELASTIC", "CONTSUP_"))}
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    e.update(extra)
    return e


def contsup(*args: str) -> list[str]:
    return [sys.executable, "-m", "contsup", *args]


def script(code: str, *args: str) -> list[str]:
    """``python -c CODE ARGS``: CODE is :data:`API` followed by an indented block, or any indented block."""
    head = API if code.startswith(API) else ""
    return [sys.executable, "-c", head + textwrap.dedent(code[len(head):]), *args]


def _limits(nofile: int | None, fsize: int | None) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return apply


def run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: float = 60, nofile: int | None = None,
        fsize: int | None = None, stdout: str = "pipe") -> dict:
    """``cmd`` in its own session; its exit status (None on a timeout), output and seconds.
    ``stdout``: "pipe", "full" (/dev/full) or "closed"."""
    start = time.monotonic()
    out_target: Any = subprocess.PIPE
    if stdout == "full":
        out_target = open("/dev/full", "w")
    elif stdout == "closed":
        out_target = subprocess.DEVNULL
    err_path = cwd / f".stderr-{time.monotonic_ns()}"
    with open(err_path, "w+b") as err_file:
        pass_fds = ()
        proc = subprocess.Popen(cmd, stdout=out_target, stderr=err_file, stdin=subprocess.DEVNULL, cwd=cwd,
                                env=env or base_env(), start_new_session=True, preexec_fn=_limits(nofile, fsize),
                                pass_fds=pass_fds)
        if stdout == "closed":
            pass
        try:
            out, _ = proc.communicate(timeout=timeout)
            code, timed_out = proc.returncode, False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            code, timed_out = None, True
        err_file.seek(0)
        err = err_file.read().decode("utf-8", "replace")
    err_path.unlink()
    if stdout == "full":
        out_target.close()
    return {"cmd": cmd, "exit": code, "stdout": (out or b"").decode("utf-8", "replace") if isinstance(out, bytes) else (out or ""),
            "stderr": err, "timed_out": timed_out, "seconds": round(time.monotonic() - start, 2)}


def error_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not warnings, progress or blank."""
    out = []
    for line in stderr.splitlines():
        s = line.strip()
        if not s or s.startswith(("warning:", "note:")) or "it/s" in s or "s/it" in s:
            continue
        if s.startswith(("contsup ", "epoch ", "sweep ", "[", "Ctrl-C", "SIGTERM", "SIGHUP")):
            continue
        out.append(s)
    return out


def has_traceback(r: dict) -> bool:
    return "Traceback (most recent call last)" in r["stderr"] or "Traceback (most recent call last)" in r["stdout"]


# -- judging ---------------------------------------------------------------------------------------


def snapshot(*dirs: Path) -> dict[str, str]:
    """SHA-256 of every regular file under ``dirs`` (FIFOs and the lock file left out)."""
    out = {}
    for d in dirs:
        if d.is_file():
            out[str(d)] = hashlib.sha256(d.read_bytes()).hexdigest()
            continue
        for p in sorted(d.rglob("*")) if d.is_dir() else ():
            try:
                st = p.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and p.name != ".lock" and not p.name.startswith(".stderr-"):
                if st.st_size > 50_000_000:
                    out[str(p)] = f"size {st.st_size} mtime {st.st_mtime_ns}"
                else:
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISDIR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
                out[str(p)] = "dir" if stat.S_ISDIR(st.st_mode) else "fifo"
    return out


MAX_LINES = 6  # a recipe's problems are one line each: a few, never one per character


def refusal(r: dict, *keywords: str, exits: tuple[int, ...] = (2,), before: dict | None = None,
            dirs: tuple[Path, ...] = (), single: bool = False) -> tuple[str, str]:
    """An input that must be refused: ``error:`` lines (one per problem, a few at most; exactly
    one with ``single``) naming every keyword (any of the alternatives ``a|b``), an exit status
    in ``exits``, and nothing of ``dirs`` changed."""
    changed = before is not None and snapshot(*dirs) != before
    lines = error_lines(r["stderr"])
    if r["exit"] == 0:
        return "silent", "accepted (exit 0) without a word" + ("; files changed" if changed else "")
    if changed:
        return "silent", f"refused (exit {r['exit']}) but files of the run changed"
    if r["exit"] not in exits:
        return "unclear", f"exit {r['exit']}, expected {exits}"
    if not lines or not all(line.startswith("error:") for line in lines):
        return "unclear", "not only error: lines" if lines else "no error line"
    if len(lines) > (1 if single else MAX_LINES):
        return "unclear", f"{len(lines)} error lines"
    text = " ".join(lines).lower()
    missing = [k for k in keywords if not any(alt.lower() in text for alt in k.split("|"))]
    if missing:
        return "unclear", f"the error does not name {', '.join(missing)}"
    return "held", ""


def success(r: dict, check: Callable[[], str | None]) -> tuple[str, str]:
    """A command that must succeed and give the right result: ``check()`` says what is wrong (None: nothing)."""
    if r["exit"] != 0:
        lines = error_lines(r["stderr"])
        return "unclear", f"exit {r['exit']}: {lines[0][:150] if lines else 'no error line'}"
    problem = check()
    return ("silent", problem) if problem else ("held", "")


def either(r: dict, check: Callable[[], str | None], *keywords: str, exits: tuple[int, ...] = (2,),
           before: dict | None = None, dirs: tuple[Path, ...] = ()) -> tuple[str, str]:
    """Right when refused in one line (as :func:`refusal`) or when it succeeds with a right result."""
    if r["exit"] == 0:
        problem = check()
        return ("silent", problem) if problem else ("held", "")
    return refusal(r, *keywords, exits=exits, before=before, dirs=dirs)


# -- the cases --------------------------------------------------------------------------------------


class Case:
    """One attack: ``make(d)`` prepares its folder ``d`` and returns (command, options, judge)."""

    def __init__(self, family: str, name: str, make: Callable[[Path], tuple[list[str], dict, Callable[[dict, Path], tuple[str, str]]]]):
        self.family, self.name, self.make = family, name, make


CASES: list[Case] = []


def case(family: str, name: str):
    def add(make):
        CASES.append(Case(family, name, make))
        return make
    return add


FIX: dict[str, Path] = {}  # fixture runs, built once


def copy_run(name: str, d: Path, to: str = "run") -> Path:
    dst = d / to
    shutil.copytree(FIX[name], dst, symlinks=True)
    return dst


def metrics(run_dir: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def newest_checkpoint(run_dir: Path) -> dict | None:
    import torch

    paths = sorted((run_dir / "checkpoints").glob("step-*.pt"))
    if not paths:
        return None
    return torch.load(paths[-1], map_location="cpu", weights_only=True)


def model_tensors(path: Path) -> dict | None:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None


def same_tensors(a: dict | None, b: dict | None) -> bool:
    import torch

    return a is not None and b is not None and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- resume --force ---------------------------------------------------------------------------------


def _forced(fixture: str, sets: list[str], judge_fn, extra_args: tuple[str, ...] = ()):
    def make(d: Path):
        run_dir = copy_run(fixture, d)
        before = snapshot(run_dir)
        cmd = contsup("train", "--resume", str(run_dir), "--force", *extra_args, *[a for s in sets for a in ("--set", s)])
        return cmd, {}, lambda r, d: judge_fn(r, run_dir, before)
    return make


def lr_ratio_check(run_dir: Path, ratio: float, epoch: int = 2) -> Callable[[], str | None]:
    def check() -> str | None:
        got, ref = metrics(run_dir), metrics(FIX["fin"])
        if len(got) < epoch:
            return f"metrics.jsonl has {len(got)} epochs"
        a, b = got[epoch - 1]["lr"], ref[epoch - 1]["lr"]
        if abs(a - ratio * b) > 1e-9 + 1e-6 * abs(ratio * b):
            return f"epoch {epoch} trained at lr {a:g}, expected {ratio * b:g} (the new optimizer.lr)"
        return None
    return check


def group_check(run_dir: Path, key: str, value: Any) -> Callable[[], str | None]:
    def check() -> str | None:
        state = newest_checkpoint(run_dir)
        if state is None:
            return "no checkpoint"
        got = [g.get(key) for o in state["optimizers"] for g in o["param_groups"]]
        if any(v != value for v in got):
            return f"the optimizers' {key} is {got[0]!r}, expected {value!r} (--force did not apply it)"
        return None
    return check


for _fixture, _where in (("end1", "stopped at the end of epoch 1"), ("mid", "stopped inside epoch 2")):
    case("resume", f"--force optimizer.lr=0.5, {_where}")(
        _forced(_fixture, ["optimizer.lr=0.5"], lambda r, run_dir, before: success(r, lr_ratio_check(run_dir, 10.0))))
    case("resume", f"--force optimizer.weight_decay=0.01, {_where}")(
        _forced(_fixture, ["optimizer.weight_decay=0.01"],
                lambda r, run_dir, before: success(r, group_check(run_dir, "weight_decay", 0.01))))
    case("resume", f"--force optimizer.lr=0.5 and weight_decay=0.01, {_where}")(
        _forced(_fixture, ["optimizer.lr=0.5", "optimizer.weight_decay=0.01"],
                lambda r, run_dir, before: success(r, lambda: lr_ratio_check(run_dir, 10.0)() or group_check(run_dir, "weight_decay", 0.01)())))
    case("resume", f"--force optimizer.momentum=0.5, {_where}")(
        _forced(_fixture, ["optimizer.momentum=0.5"], lambda r, run_dir, before: success(r, group_check(run_dir, "momentum", 0.5))))
    case("resume", f"--force optimizer.nesterov=false, {_where}")(
        _forced(_fixture, ["optimizer.nesterov=false"], lambda r, run_dir, before: success(r, group_check(run_dir, "nesterov", False))))
    for _key, _value in (("backbone.use", "cifar_resnet32"), ("partition.modules", "2"), ("context.use", "none"),
                         ("run.mode", "e2e"), ("data.use", "digits"), ("decoder.use", "infopro"), ("objective.use", "supcon")):
        case("resume", f"--force {_key}={_value} (cannot apply), {_where}")(
            _forced(_fixture, [f"{_key}={_value}"],
                    lambda r, run_dir, before, _key=_key: refusal(r, _key, before=before, dirs=(run_dir,))))
    case("resume", f"--force run.seed=5 (the checkpoint's RNG continues), {_where}")(
        _forced(_fixture, ["run.seed=5"], lambda r, run_dir, before: refusal(r, "run.seed", before=before, dirs=(run_dir,))))


def _warmup_check(run_dir: Path) -> Callable[[], str | None]:
    def check() -> str | None:
        import math

        got = metrics(run_dir)
        if len(got) < 2:
            return "fewer than 2 epochs"
        warm, span = 4, 12 - 4
        expected = 0.05 * 0.5 * (1 + math.cos(math.pi * (8 - warm) / span))
        if abs(got[1]["lr"] - expected) > 1e-9:
            return f"epoch 2 lr {got[1]['lr']:g}, expected {expected:g} with schedule.warmup_epochs = 1"
        return None
    return check


case("resume", "--force schedule.warmup_epochs=1, stopped at the end of epoch 1")(
    _forced("end1", ["schedule.warmup_epochs=1"], lambda r, run_dir, before: success(r, _warmup_check(run_dir))))


def _longer_check(run_dir: Path) -> Callable[[], str | None]:
    def check() -> str | None:
        import math

        got = metrics(run_dir)
        if [m["epoch"] for m in got] != [1, 2, 3, 4]:
            return f"epochs {[m['epoch'] for m in got]}"
        expected = 0.05 * 0.5 * (1 + math.cos(math.pi * 8 / 16))
        if abs(got[1]["lr"] - expected) > 1e-9:
            return f"epoch 2 lr {got[1]['lr']:g}, expected {expected:g} for a 4-epoch schedule"
        return None if (run_dir / "model.pt").exists() else "no model.pt"
    return check


case("resume", "--force run.epochs=4 (longer), stopped at the end of epoch 1")(
    _forced("end1", ["run.epochs=4"], lambda r, run_dir, before: success(r, _longer_check(run_dir))))
case("resume", "--force run.epochs=1, stopped inside epoch 2 (weights from a later point)")(
    _forced("mid", ["run.epochs=1"], lambda r, run_dir, before: refusal(r, "run.epochs", before=before, dirs=(run_dir,))))


def _epochs1_at_end(r: dict, run_dir: Path, before: dict) -> tuple[str, str]:
    ckpt = sorted((FIX["end1"] / "checkpoints").glob("step-*.pt"))[-1]

    def check() -> str | None:
        import torch

        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if len(metrics(run_dir)) != 1:
            return f"metrics.jsonl has {len(metrics(run_dir))} epochs"
        if not same_tensors(model_tensors(run_dir / "model.pt"), state["model"]):
            return "model.pt is not the weights of the end of epoch 1"
        return None
    return either(r, check, "run.epochs", before=before, dirs=(run_dir,))


case("resume", "--force run.epochs=1, stopped at the end of epoch 1")(_forced("end1", ["run.epochs=1"], _epochs1_at_end))
case("resume", "--force run.epochs=2, stopped inside epoch 2")(
    _forced("mid", ["run.epochs=2"], lambda r, run_dir, before: success(
        r, lambda: None if [m["epoch"] for m in metrics(run_dir)] == [1, 2] and (run_dir / "model.pt").exists() else "not 2 epochs and a model")))
case("resume", "--force run.epochs=1 on a finished run")(
    _forced("fin", ["run.epochs=1"], lambda r, run_dir, before: refusal(r, "run.epochs|finished", before=before, dirs=(run_dir,))))
case("resume", "--force data.batch_size=4, stopped inside epoch 2 (steps per epoch change)")(
    _forced("mid", ["data.batch_size=4"], lambda r, run_dir, before: refusal(r, "data.batch_size", before=before, dirs=(run_dir,))))
case("resume", "--force data.batch_size=4, stopped at the end of epoch 1")(
    _forced("end1", ["data.batch_size=4"], lambda r, run_dir, before: success(
        r, lambda: None if len(metrics(run_dir)) == 3 else f"{len(metrics(run_dir))} epochs")))


def _unchanged_exact(r: dict, run_dir: Path, before: dict) -> tuple[str, str]:
    return success(r, lambda: None if same_tensors(model_tensors(run_dir / "model.pt"), model_tensors(FIX["fin"] / "model.pt"))
                   else "the resumed run is not bit-exact with the uninterrupted one")


case("resume", "--force with nothing changed is bit-exact")(_forced("mid", [], _unchanged_exact))
case("resume", "plain --resume is bit-exact")(
    lambda d: (lambda run_dir: (contsup("train", "--resume", str(run_dir)), {}, lambda r, d: _unchanged_exact(r, run_dir, {})))(copy_run("mid", d)))
case("resume", "--force run.checkpoint_every_steps=2 (changes nothing computed)")(
    _forced("mid", ["run.checkpoint_every_steps=2"], _unchanged_exact))


def _resume_with_file(d: Path):
    run_dir = copy_run("end1", d)
    recipe = d / "other.toml"
    recipe.write_text(tiny(run_dir, every=0).replace("lr = 0.05", "lr = 0.5"))
    cmd = contsup("train", str(recipe), "--resume", str(run_dir), "--force")
    return cmd, {}, lambda r, d: success(r, lr_ratio_check(run_dir, 10.0))


case("resume", "--force with another recipe file (lr 0.5)")(_resume_with_file)


def _refused_force_keeps_recipe(d: Path):
    run_dir = copy_run("mid", d)
    before = (run_dir / "recipe.toml").read_bytes()
    cmd = contsup("train", "--resume", str(run_dir), "--force", "--set", "partition.modules=2")

    def judge(r, d):
        if r["exit"] != 0 and (run_dir / "recipe.toml").read_bytes() != before:
            return "silent", "refused, but recipe.toml was rewritten first"
        r2 = run(contsup("train", "--resume", str(run_dir)), d)
        if r2["exit"] != 0:
            return "silent", "after the refused --force the run can no longer be resumed"
        return refusal(r, "partition.modules")
    return cmd, {}, judge


case("resume", "a refused --force leaves the run resumable")(_refused_force_keeps_recipe)


# ---- eval ------------------------------------------------------------------------------------------------


def _eval_output(r: dict) -> str:
    return "\n".join(line for line in r["stdout"].splitlines() if "test error" in line or line[:1].isdigit())


def _intact_eval(run_dir: Path, d: Path, *args: str) -> dict:
    return run(contsup("eval", str(run_dir), *args), d)


def _edit_key(text: str, table: str, key: str, value: str) -> str:
    """``text`` (a TOML file) with ``key`` of ``[table]`` set to ``value``."""
    head = f"[{table}]\n"
    start = text.index(head) + len(head)
    end = text.find("\n[", start)
    end = len(text) if end < 0 else end
    body = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text[start:end]) if re.search(rf"(?m)^{key} = ", text[start:end]) \
        else text[start:end] + f"{key} = {value}\n"
    return text[:start] + body + text[end:]


def _edited_recipe(table: str, key: str, value: str):
    def make(d: Path):
        run_dir = copy_run("fin", d)
        intact = _intact_eval(run_dir, d)
        text = (run_dir / "recipe.toml").read_text()
        (run_dir / "recipe.toml").write_text(_edit_key(text, table, key, value))

        def judge(r, d):
            if r["exit"] == 0 and not any(line.startswith("warning:") and "recipe.toml" in line for line in r["stderr"].splitlines()):
                if _eval_output(r) != _eval_output(intact):
                    return "silent", "evaluated the edited recipe without a word"
                return "held", ""
            if r["exit"] == 0:
                return "held", ""
            return refusal(r, "recipe.toml")
        return contsup("eval", str(run_dir)), {}, judge
    return make


for _table, _key, _value in (("data", "test_size", "8"), ("data", "seed", "3"), ("data", "noise", "2.0"),
                             ("optimizer", "lr", "0.9")):
    case("eval", f"eval after recipe.toml was edited: {_table}.{_key} = {_value}")(_edited_recipe(_table, _key, _value))


def _write_images(root: Path, classes: list[str], seed: int, n: int = 4, mode: str = "RGB", maker=None) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                if maker is not None:
                    img = maker(rng)
                else:
                    img = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
                img.save(folder / f"{i}.png")


def _image_run(d: Path) -> Path:
    """A copy of the image run, trained in FIX['img'] with the relative root "imgs"."""
    shutil.copytree(FIX["img"], d / "train-dir", symlinks=True)
    return d / "train-dir"


def _relative_root_elsewhere(d: Path):
    base = _image_run(d)
    run_dir = base / "run"
    intact = run(contsup("eval", str(run_dir)), base)
    elsewhere = d / "elsewhere"
    _write_images(elsewhere / "imgs", ["a", "b"], seed=99)
    return contsup("eval", str(run_dir)), {"cwd": elsewhere}, lambda r, d: either(
        r, lambda: None if _eval_output(r) == _eval_output(intact) else "evaluated the images of another folder (a relative data.root)",
        "imgs")


case("eval", "eval from another directory, relative data.root (other images there)")(_relative_root_elsewhere)


def _relative_root_missing(d: Path):
    base = _image_run(d)
    run_dir = base / "run"
    intact = run(contsup("eval", str(run_dir)), base)
    (d / "empty").mkdir()
    return contsup("eval", str(run_dir)), {"cwd": d / "empty"}, lambda r, d: either(
        r, lambda: None if _eval_output(r) == _eval_output(intact) else "another result", "imgs")


case("eval", "eval from another directory, relative data.root (nothing there)")(_relative_root_missing)


def _other_classes(classes: list[str], ok: bool, extra_args: tuple[str, ...] = ()):
    def make(d: Path):
        base = _image_run(d)
        other = d / "other"
        _write_images(other, classes, seed=7)
        cmd = contsup("eval", str(base / "run"), "--data", f"root={other}", *extra_args)
        if ok:
            return cmd, {}, lambda r, d: success(r, lambda: None)
        return cmd, {}, lambda r, d: refusal(r, "classes.json|class")
    return make


case("eval", "eval --data root=OTHER with other class names")(_other_classes(["a", "c"], ok=False))
case("eval", "eval --data root=OTHER with other class names, --json")(_other_classes(["x", "y"], ok=False, extra_args=("--json",)))
case("eval", "eval --data root=OTHER with the same class names")(_other_classes(["a", "b"], ok=True))
case("eval", "eval --data root=OTHER with three classes")(_other_classes(["a", "b", "c"], ok=False))


def _api_eval_other_classes(d: Path):
    base = _image_run(d)
    other = d / "other"
    _write_images(other, ["p", "q"], seed=3)
    code = API + f"""
    try:
        print(contsup.evaluate(sys.argv[1], data=["root={other}"]))
    except contsup.ContsupError as exc:
        one_line(exc)
    """
    return script(code, str(base / "run")), {}, lambda r, d: refusal(r, "class")


case("eval", "evaluate(run, data=[root=OTHER]) with other class names")(_api_eval_other_classes)


def _classes_json_edited(d: Path):
    base = _image_run(d)
    (base / "run" / "classes.json").write_text(json.dumps(["b", "a"]))
    return contsup("eval", str(base / "run")), {"cwd": base}, lambda r, d: refusal(r, "classes.json")


case("eval", "eval with classes.json edited (labels swapped)")(_classes_json_edited)


def _renamed_class_folder(d: Path):
    """A run of its own (the fixture's records where its images are): its data's folder b renamed."""
    _write_images(d / "imgs", ["a", "b"], seed=0)
    (d / "r.toml").write_text(IMAGE_RECIPE.format(out_dir=d / "run", root=d / "imgs"))
    trained = run(contsup("train", str(d / "r.toml")), d, timeout=300)
    assert trained["exit"] == 0, trained["stderr"][-500:]
    for split in ("train", "val"):
        (d / "imgs" / split / "b").rename(d / "imgs" / split / "z")
    return contsup("eval", str(d / "run")), {}, lambda r, d: refusal(r, "class")


case("eval", "eval after a class folder of the data was renamed")(_renamed_class_folder)


def _eval_data(items: list[str], ok: bool, keyword: str = "", api: bool = False):
    def make(d: Path):
        run_dir = copy_run("fin", d)
        if api:
            code = API + """
            try:
                print(contsup.evaluate(sys.argv[1], data=sys.argv[2:]))
            except contsup.ContsupError as exc:
                one_line(exc)
            """
            cmd = script(code, str(run_dir), *items)
        else:
            cmd = contsup("eval", str(run_dir), *[a for i in items for a in ("--data", i)])
        if ok:
            return cmd, {}, lambda r, d: success(r, lambda: None)
        return cmd, {}, lambda r, d: refusal(r, keyword)
    return make


case("eval", "eval --data shape=[3,16,16] (another input shape)")(_eval_data(["shape=[3,16,16]"], ok=False, keyword="shape"))
case("eval", "evaluate(data=[shape=[3,16,16]])")(_eval_data(["shape=[3,16,16]"], ok=False, keyword="shape", api=True))
case("eval", "eval --data shape=[1,8,8] (other channels)")(_eval_data(["shape=[1,8,8]"], ok=False, keyword="shape|do not fit"))
case("eval", "evaluate(data=[shape=[1,8,8]])")(_eval_data(["shape=[1,8,8]"], ok=False, keyword="shape|do not fit", api=True))
case("eval", "eval --data classes=5")(_eval_data(["classes=5"], ok=False, keyword="classes|do not fit"))
case("eval", "evaluate(data=[classes=5])")(_eval_data(["classes=5"], ok=False, keyword="classes|do not fit", api=True))
case("eval", "evaluate(data=[use=digits]) (another dataset)")(_eval_data(["use=digits"], ok=False, keyword="shape|do not fit|classes", api=True))
case("eval", "eval --data test_batch_size=1")(_eval_data(["test_batch_size=1"], ok=True))
case("eval", "eval --data test_size=0")(_eval_data(["test_size=0"], ok=False, keyword="test_size"))


# ---- odd files ----------------------------------------------------------------------------------------


def _fifo(path: Path) -> Path:
    if path.exists() or path.is_symlink():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    os.mkfifo(path)
    return path


def _fifo_case(fixture: str | None, target: str, command: Callable[[Path, Path], list[str]], keyword: str, exits=(2,)):
    def make(d: Path):
        if fixture is None:
            run_dir = d
            (d / "base.toml").write_text(tiny(d / "run"))
            (d / "child.toml").write_text('extends = "base.toml"\n')
        else:
            run_dir = copy_run(fixture, d)
        _fifo(run_dir / target)
        before = snapshot(run_dir)
        return command(run_dir, d), {}, lambda r, d: refusal(r, keyword, exits=exits, before=before, dirs=(run_dir,))
    return make


case("files", "recipe is a FIFO: validate")(_fifo_case(None, "recipe.toml", lambda rd, d: contsup("validate", str(rd / "recipe.toml")), "recipe.toml"))
case("files", "recipe is a FIFO: train")(_fifo_case(None, "recipe.toml", lambda rd, d: contsup("train", str(rd / "recipe.toml")), "recipe.toml"))
case("files", "recipe is a FIFO: plan")(_fifo_case(None, "recipe.toml", lambda rd, d: contsup("plan", str(rd / "recipe.toml")), "recipe.toml"))
case("files", "extends target is a FIFO: validate")(_fifo_case(None, "base.toml", lambda rd, d: contsup("validate", str(rd / "child.toml")), "base.toml"))
case("files", "metrics.jsonl is a FIFO: results")(_fifo_case("fin", "metrics.jsonl", lambda rd, d: contsup("results", str(rd)), "metrics.jsonl"))
case("files", "metrics.jsonl is a FIFO: report")(_fifo_case("fin", "metrics.jsonl", lambda rd, d: contsup("report", str(rd), "-o", str(d / "rep")), "metrics.jsonl"))
def _fifo_metrics_resume(d: Path):
    """A resume rewrites metrics.jsonl from its checkpoint: replacing the FIFO is right too."""
    run_dir = copy_run("mid", d)
    _fifo(run_dir / "metrics.jsonl")
    before = snapshot(run_dir)
    return contsup("train", "--resume", str(run_dir)), {}, lambda r, d: either(
        r, lambda: None if [m["epoch"] for m in metrics(run_dir)] == [1, 2, 3] and (run_dir / "model.pt").exists()
        else "not the run's three epochs", "metrics.jsonl", before=before, dirs=(run_dir,))


case("files", "metrics.jsonl is a FIFO: --resume")(_fifo_metrics_resume)
case("files", "run's recipe.toml is a FIFO: eval")(_fifo_case("fin", "recipe.toml", lambda rd, d: contsup("eval", str(rd)), "recipe.toml"))
case("files", "run's recipe.toml is a FIFO: --resume")(_fifo_case("mid", "recipe.toml", lambda rd, d: contsup("train", "--resume", str(rd)), "recipe.toml"))
case("files", "run's recipe.toml is a FIFO: results")(_fifo_case("fin", "recipe.toml", lambda rd, d: contsup("results", str(rd)), "recipe.toml"))
case("files", "model.pt is a FIFO: eval")(_fifo_case("fin", "model.pt", lambda rd, d: contsup("eval", str(rd)), "model.pt"))
case("files", "model.pt is a FIFO: weights")(_fifo_case("fin", "model.pt", lambda rd, d: contsup("weights", str(rd), "-o", str(d / "w.png")), "model.pt"))
case("files", "model.pt.sha256 is a FIFO: eval")(_fifo_case("fin", "model.pt.sha256", lambda rd, d: contsup("eval", str(rd)), "model.pt"))
case("files", "classes.json is a FIFO: eval")(_fifo_case("fin", "classes.json", lambda rd, d: contsup("eval", str(rd)), "classes.json"))
case("files", "plugins.json is a FIFO: results")(
    lambda d: (lambda rd: (contsup("results", str(rd)), {}, lambda r, d: success(r, lambda: None)))(
        (lambda rd: (_fifo(rd / "plugins.json"), rd)[1])(copy_run("fin", d))))


def _fifo_model_api(d: Path):
    run_dir = copy_run("fin", d)
    _fifo(run_dir / "model.pt")
    code = API + """
    try:
        contsup.load_model(sys.argv[1])
    except contsup.ContsupError as exc:
        one_line(exc)
    """
    return script(code, str(run_dir)), {}, lambda r, d: refusal(r, "model.pt")


case("files", "model.pt is a FIFO: load_model")(_fifo_model_api)


def _fifo_checkpoint_digest(d: Path):
    run_dir = copy_run("mid", d)
    newest = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1]
    _fifo(newest.with_name(newest.name + ".sha256"))
    return contsup("train", "--resume", str(run_dir)), {}, lambda r, d: either(
        r, lambda: None if (run_dir / "model.pt").exists() else "no model", "sha256")


case("files", "a checkpoint's digest is a FIFO: --resume")(_fifo_checkpoint_digest)


def _fifo_checkpoint(d: Path):
    run_dir = copy_run("mid", d)
    newest = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1]
    _fifo(newest)
    return contsup("train", "--resume", str(run_dir)), {}, lambda r, d: either(
        r, lambda: None if (run_dir / "model.pt").exists() else "no model", "step-")


case("files", "a checkpoint is a FIFO: --resume")(_fifo_checkpoint)


def _device_file(device: str, as_what: str):
    def make(d: Path):
        if as_what == "recipe":
            return contsup("validate", device), {}, lambda r, d: refusal(r, device)
        (d / "child.toml").write_text(f'extends = "{device}"\n')
        return contsup("validate", str(d / "child.toml")), {}, lambda r, d: refusal(r, device)
    return make


for _dev in ("/dev/zero", "/dev/urandom"):
    case("files", f"{_dev} as the recipe: validate")(_device_file(_dev, "recipe"))
    case("files", f"{_dev} as the extends target: validate")(_device_file(_dev, "extends"))
case("files", "/dev/null as the recipe: validate")(lambda d: (contsup("validate", "/dev/null"), {}, lambda r, d: refusal(r, "/dev/null")))


def _sparse(path: Path, size: int, head: bytes = b"") -> None:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)


def _huge(target: str, command: Callable[[Path, Path], list[str]], keyword: str, fixture: str | None = "fin", head: bytes = b"",
          keep_digest: bool = True):
    def make(d: Path):
        if fixture is None:
            run_dir = d
        else:
            run_dir = copy_run(fixture, d)
        path = run_dir / target
        if not keep_digest:
            path.with_name(path.name + ".sha256").unlink(missing_ok=True)
        _sparse(path, 3 << 30, head)
        before = snapshot(run_dir)
        return command(run_dir, d), {}, lambda r, d: refusal(r, keyword, before=before, dirs=(run_dir,))
    return make


case("files", "a 3 GB recipe (sparse): validate")(_huge("big.toml", lambda rd, d: contsup("validate", str(rd / "big.toml")), "big.toml", fixture=None, head=b"[run]\n#"))
case("files", "a 3 GB metrics.jsonl (sparse): results")(_huge("metrics.jsonl", lambda rd, d: contsup("results", str(rd)), "metrics.jsonl"))
case("files", "a 3 GB model.pt with its digest: eval")(_huge("model.pt", lambda rd, d: contsup("eval", str(rd)), "model.pt"))
case("files", "a 3 GB model.pt without a digest: eval")(_huge("model.pt", lambda rd, d: contsup("eval", str(rd)), "model.pt", keep_digest=False))
case("files", "a 3 GB recipe.toml in a run: eval")(_huge("recipe.toml", lambda rd, d: contsup("eval", str(rd)), "recipe.toml", head=b"[run]\n#"))


def _image_mode(mode: str, make_image, tol: float = 1.5 / 255):
    """Images of ``mode`` must reach the network as their 8-bit equivalents do (or be refused in one line)."""
    def make(d: Path):
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        odd, plain = d / "odd", d / "plain"
        for split in ("train", "val"):
            for c in ("a", "b"):
                for i in range(2):
                    img, ref = make_image(rng)
                    for root, im in ((odd, img), (plain, ref)):
                        (root / split / c).mkdir(parents=True, exist_ok=True)
                        im.save(root / split / c / f"{i}{'.tif' if im.mode in ('I', 'F') else '.png'}")
        (d / "template.toml").write_text(IMAGE_RECIPE.format(out_dir=d / "r", root="ROOT"))
        code = API + f"""
        import pathlib, torch
        from contsup.core.registry import load_registries
        from contsup.config.recipe import loads_recipe
        _, reg = load_registries()
        out = []
        for root in (sys.argv[1], sys.argv[2]):
            text = pathlib.Path({str(d / "template.toml")!r}).read_text().replace("ROOT", root)
            try:
                recipe = loads_recipe(text, reg)
                ds = recipe.dataset.create().load(train=False)
                out.append(torch.stack([ds[i][0] for i in range(len(ds))]))
            except contsup.ContsupError as exc:
                one_line(exc)
        diff = (out[0] - out[1]).abs().max().item()
        print(json.dumps({{"diff": diff}}))
        """
        return script(code, str(odd), str(plain)), {}, lambda r, d: either(
            r, lambda: _mode_diff(r, tol), mode, exits=(1, 2))
    return make


def _mode_diff(r: dict, tol: float) -> str | None:
    try:
        diff = json.loads(r["stdout"].strip().splitlines()[-1])["diff"]
    except (ValueError, IndexError, KeyError):
        return "no result"
    # normalised by timm's std (about 0.225): one 8-bit level is about 0.0174
    return None if diff <= tol / 0.224 else f"the images reached the network changed (max difference {diff:.3f} after normalisation)"


def _grey16(rng):
    from PIL import Image

    v8 = rng.integers(0, 256, (8, 8)).astype("uint16")
    return Image.fromarray(v8 * 257), Image.fromarray(v8.astype("uint8")).convert("RGB")


def _grey32(rng):
    from PIL import Image

    v8 = rng.integers(0, 256, (8, 8))
    return Image.fromarray((v8 * 257).astype("int32")), Image.fromarray(v8.astype("uint8")).convert("RGB")


def _float(rng):
    from PIL import Image

    v8 = rng.integers(0, 256, (8, 8))
    return Image.fromarray((v8 / 255.0).astype("float32")), Image.fromarray(v8.astype("uint8")).convert("RGB")


def _bilevel(rng):
    from PIL import Image

    v = rng.integers(0, 2, (8, 8)).astype(bool)
    return Image.fromarray(v).convert("1"), Image.fromarray((v * 255).astype("uint8")).convert("RGB")


def _grey_alpha(rng):
    from PIL import Image

    v8 = rng.integers(0, 256, (8, 8, 2)).astype("uint8")
    v8[..., 1] = 255
    return Image.fromarray(v8), Image.fromarray(v8[..., 0]).convert("RGB")


def _palette(rng):
    from PIL import Image

    rgb = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype="uint8"))
    p = rgb.convert("P")
    return p, p.convert("RGB")


case("files", "16-bit greyscale PNGs (I;16) reach the network faithfully")(_image_mode("I;16", _grey16))
case("files", "32-bit integer TIFFs (I) reach the network faithfully")(_image_mode("mode I", _grey32))
case("files", "float TIFFs (F) reach the network faithfully")(_image_mode("mode F", _float))
case("files", "bilevel PNGs (1)")(_image_mode("mode 1", _bilevel))
case("files", "greyscale+alpha PNGs (LA)")(_image_mode("mode LA", _grey_alpha))
case("files", "palette PNGs (P)")(_image_mode("mode P", _palette))


def _one_class(command: str):
    def make(d: Path):
        _write_images(d / "imgs", ["only"], seed=1)
        (d / "r.toml").write_text(IMAGE_RECIPE.format(out_dir=d / "run", root=d / "imgs"))
        return contsup(command, str(d / "r.toml")), {}, lambda r, d: refusal(r, "class")
    return make


case("files", "one class folder: train")(_one_class("train"))
case("files", "one class folder: validate")(_one_class("validate"))


def _one_class_eval(d: Path):
    base = _image_run(d)
    _write_images(d / "one", ["a"], seed=5)
    return contsup("eval", str(base / "run"), "--data", f"root={d / 'one'}"), {}, lambda r, d: refusal(r, "class")


case("files", "one class folder: eval --data root=")(_one_class_eval)


def _imagefolder_fifo_image(d: Path):
    _write_images(d / "imgs", ["a", "b"], seed=1)
    os.mkfifo(d / "imgs" / "train" / "a" / "fifo.png")
    (d / "r.toml").write_text(IMAGE_RECIPE.format(out_dir=d / "run", root=d / "imgs"))
    return contsup("train", str(d / "r.toml")), {}, lambda r, d: success(r, lambda: None)


case("files", "a FIFO named .png in an image folder: train")(_imagefolder_fifo_image)


def _synthetic_classes1(command: str):
    def make(d: Path):
        (d / "r.toml").write_text(tiny(d / "run", epochs=1).replace('shape = [3, 8, 8]', 'shape = [3, 8, 8]\nclasses = 1'))
        return contsup(command, str(d / "r.toml")), {}, lambda r, d: refusal(r, "classes")
    return make


case("files", "synthetic classes = 1: train")(_synthetic_classes1("train"))


# ---- plugins -------------------------------------------------------------------------------------------

PLUGIN = '''
import os, sys
BEHAVIOUR = {behaviour!r}
def bad(what):
    return BEHAVIOUR == what
if bad("import:exit3"):
    sys.exit(3)
if bad("import:exit0"):
    sys.exit(0)
if bad("import:print"):
    print("evil plugin loaded")
if bad("import:fdprint"):
    os.write(1, b"evil plugin loaded (fd 1)\\n")
if bad("import:raise"):
    raise RuntimeError("evil plugin broken at import")

import attrs
import torch
import torch.nn.functional as F
from torch import nn
from contsup import hookimpl
from contsup.types import BackboneParts, DatasetInfo, Source


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
        if bad("sources:strings"):
            return ["x"] if module > 1 else []
        if bad("sources:module1"):
            return (Source.input(),)
        if bad("sources:int"):
            return 5
        if bad("sources:future"):
            return (Source.feature(module),) if module > 1 else ()
        if bad("sources:print"):
            print("choosing sources")
        return (Source.input(),) if module > 1 else ()

    def adapter(self, source, source_shape, target_shape):
        c, t = source_shape[0], target_shape[0]
        if bad("adapter:raise"):
            raise ValueError("adapter exploded")
        if bad("adapter:tensor"):
            return torch.zeros(1)
        if bad("adapter:broadcast"):  # (B, C, 1, 1): adds the same value everywhere
            return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, t, 1))
        if bad("adapter:onechannel"):  # (B, 1, H, W): broadcast over the channels
            return nn.Sequential(nn.AdaptiveAvgPool2d(tuple(target_shape[1:])), nn.Conv2d(c, 1, 1))
        if bad("adapter:size"):  # (B, C, H, W) of the source, not of the target
            return nn.Conv2d(c, t, 1)
        if bad("adapter:forward"):
            return Exploding()
        return None


class Exploding(nn.Module):
    def forward(self, x):
        raise RuntimeError("adapter forward exploded")


class EvilObj:
    name = "evilobj"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options):
        self.options = options

    def head(self, spec):
        if bad("head:raise"):
            raise RuntimeError("head exploded")
        if bad("head:none"):
            return None
        c = spec.shape[0]
        out = 3 if bad("head:classes") else spec.num_classes
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(c, out))

    def loss(self, z, y):
        if bad("loss:raise"):
            raise RuntimeError("loss exploded")
        if bad("loss:float"):
            return 1.5
        if bad("loss:vector"):
            return F.cross_entropy(z, y, reduction="none")
        if bad("loss:detached"):
            return F.cross_entropy(z, y).detach()
        return F.cross_entropy(z, y)

    def predict(self, z):
        if bad("predict:raise"):
            raise RuntimeError("predict exploded")
        if bad("predict:shape"):
            return z
        return z.argmax(dim=1)


class Items(torch.utils.data.Dataset):
    def __init__(self, n, train):
        self.n, self.train = n, train

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(2 * i + int(self.train))
        y = i % 10
        x = torch.randn((3, 8, 8), generator=g) + 0.1 * y
        if bad("item:raise") and i == 3:
            raise ValueError("item 3 exploded")
        if bad("item:label10") and i == 5:
            y = 10
        if bad("item:labelneg") and i == 5:
            y = -1
        if bad("item:labelfloat"):
            y = float(y)
        if bad("item:xshape"):
            x = torch.randn((3, 16, 16), generator=g)
        if bad("item:xstr"):
            x = "an image"
        return x, y


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
        if bad("info:none"):
            return None
        if bad("info:dict"):
            return {{"input_shape": (3, 8, 8), "num_classes": 10}}
        if bad("info:print"):
            print("reading the dataset's info")
        n = 1 if bad("info:classes1") else 10
        return DatasetInfo(input_shape=(3, 8, 8), num_classes=n, mean=(0.0,) * 3, std=(1.0,) * 3)

    def load(self, train):
        if bad("load:raise"):
            raise RuntimeError("load exploded")
        if bad("load:none"):
            return None
        n = 32 if train else 16
        if (bad("empty:train") and train) or (bad("empty:test") and not train):
            n = 0
        return Items(n, train)

    if BEHAVIOUR.startswith("classes:"):
        def classes(self):
            if bad("classes:raise"):
                raise RuntimeError("classes exploded")
            return ("one", "two")


class EvilNet:
    name = "evilnet"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options):
        self.options = options

    def build(self, input_shape, num_classes):
        if bad("build:raise"):
            raise RuntimeError("backbone exploded")
        if bad("build:none"):
            return None
        import timm
        from contsup_timm.cifar_resnet import CifarResNet  # noqa: F401 (registers the models)

        m = timm.create_model("cifar_resnet20", num_classes=5 if bad("build:classes") else num_classes, in_chans=input_shape[0])
        units = [m.stem(), *m.blocks()]
        if bad("build:notmodules"):
            units = ["stem"] + units[1:]
        if bad("build:empty"):
            units = []
        return BackboneParts(units=units, head=m.head())


class EvilDec:
    name = "evildec"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options):
        self.options = options

    def build(self, feature_shape, info):
        if bad("decoder:build"):
            raise RuntimeError("decoder build exploded")
        return nn.Conv2d(feature_shape[0], info.input_shape[0], 1)

    def loss(self, reconstruction, x, info):
        if bad("decoder:loss"):
            raise RuntimeError("decoder loss exploded")
        return F.mse_loss(F.interpolate(reconstruction, size=x.shape[-2:]), x)

    def weights(self, module, num_modules):
        if bad("decoder:weights"):
            return "lots"
        return (1.0, 1.0)


class EvilPart:
    name = "evilpart"

    @attrs.frozen
    class Options:
        pass

    def __init__(self, options):
        self.options = options

    def split(self, costs, k):
        if bad("split:raise"):
            raise RuntimeError("split exploded")
        if bad("split:wrong"):
            return [1] * k
        n = len(costs.units)
        base, extra = divmod(n, k)
        return tuple(base + (1 if i >= k - extra else 0) for i in range(k))


@hookimpl
def register_context_selectors(register):
    if bad("register:print"):
        print("registering")
    if bad("register:raise"):
        raise RuntimeError("register exploded")
    register(EvilSel)


@hookimpl
def register_objectives(register):
    register(EvilObj)


@hookimpl
def register_datasets(register):
    register(EvilData)


@hookimpl
def register_backbones(register):
    register(EvilNet)


@hookimpl
def register_decoders(register):
    register(EvilDec)


@hookimpl
def register_partitioners(register):
    register(EvilPart)
'''


def plugin_env(d: Path, behaviour: str) -> dict[str, str]:
    """A third-party plugin ``evil`` (distribution contsup-evil 0.1) installed on PYTHONPATH."""
    site = d / "site"
    site.mkdir(exist_ok=True)
    (site / "evil_plugin.py").write_text(PLUGIN.format(behaviour=behaviour))
    info = site / "contsup_evil-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: contsup-evil\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[contsup]\nevil = evil_plugin\n")
    return base_env(PYTHONPATH=str(site))


def plugin_recipe(d: Path, table: str | None, epochs: int = 1) -> Path:
    text = tiny(d / "run", epochs=epochs, every=0)
    if table == "context":
        text = text.replace('use = "R1E"', 'use = "evilsel"')
    elif table == "objective":
        text += '\n[objective]\nuse = "evilobj"\n'
    elif table == "data":
        text = text.replace('use = "synthetic"\nshape = [3, 8, 8]\ntrain_size = 32\ntest_size = 16\n', 'use = "evildata"\n')
    elif table == "backbone":
        text = text.replace('use = "cifar_resnet20"', 'use = "evilnet"')
    elif table == "decoder":
        text += '\n[decoder]\nuse = "evildec"\n'
    elif table == "partition":
        text = text.replace("[partition]\n", '[partition]\nuse = "evilpart"\n')
    path = d / "r.toml"
    path.write_text(text)
    return path


def _plugin_case(behaviour: str, table: str | None, command: str, method: str, exits=(1, 2)):
    def make(d: Path):
        env = plugin_env(d, behaviour)
        recipe = plugin_recipe(d, table)
        cmd = contsup(command, str(recipe)) if command != "eval" else None
        if command == "eval":
            run_dir = copy_run("fin", d)
            cmd = contsup("eval", str(run_dir))
        return cmd, {"env": env}, lambda r, d: refusal(r, "evil", "contsup-evil", method, exits=exits)
    return make


PLUGIN_CASES = [
    ("sources:raise", "context", "sources"), ("sources:none", "context", "sources"), ("sources:strings", "context", "sources"),
    ("sources:module1", "context", "sources"), ("sources:int", "context", "sources"), ("sources:future", "context", "sources"),
    ("adapter:raise", "context", "adapter"), ("adapter:tensor", "context", "adapter"), ("adapter:broadcast", "context", "adapter"),
    ("adapter:onechannel", "context", "adapter"), ("adapter:size", "context", "adapter"), ("adapter:forward", "context", "adapter|forward"),
    ("head:raise", "objective", "head"), ("head:none", "objective", "head"), ("loss:raise", "objective", "loss"),
    ("loss:float", "objective", "loss"), ("loss:vector", "objective", "loss"), ("loss:detached", "objective", "loss"),
    ("predict:raise", "objective", "predict"), ("predict:shape", "objective", "predict"),
    ("info:raise", "data", "info"), ("info:none", "data", "info"), ("info:dict", "data", "info"), ("info:classes1", "data", "class"),
    ("load:raise", "data", "load"), ("load:none", "data", "load"), ("item:raise", "data", "item|getitem"),
    ("item:label10", "data", "label"), ("item:labelneg", "data", "label"), ("item:labelfloat", "data", "label"),
    ("item:xshape", "data", "shape"), ("item:xstr", "data", "item|image|tensor"), ("empty:train", "data", "train"),
    ("empty:test", "data", "test"), ("classes:raise", "data", "classes"),
    ("build:raise", "backbone", "build"), ("build:none", "backbone", "build"), ("build:classes", "backbone", "build|classes"),
    ("build:notmodules", "backbone", "build|unit"), ("build:empty", "backbone", "build|unit"),
    ("decoder:build", "decoder", "build"), ("decoder:loss", "decoder", "loss"), ("decoder:weights", "decoder", "weights"),
    ("split:raise", "partition", "split"), ("split:wrong", "partition", "split"),
]
for _b, _table, _method in PLUGIN_CASES:
    case("plugins", f"{_table} plugin {_b}: train")(_plugin_case(_b, _table, "train", _method))
def _validate_case(behaviour: str, table: str, method: str, ran: bool):
    """validate: a component it calls (info, build) must be named when it fails; one it does not
    call (sources, head: they run when the network is built) may pass as well."""
    def make(d: Path):
        cmd, opts, judge = _plugin_case(behaviour, table, "validate", method)(d)
        if ran:
            return cmd, opts, judge
        return cmd, opts, lambda r, d: either(r, lambda: None, "evil", "contsup-evil", method, exits=(1, 2))
    return make


for _b, _table, _method, _ran in (("sources:raise", "context", "sources", False), ("info:raise", "data", "info", True),
                                  ("build:raise", "backbone", "build", True), ("head:raise", "objective", "head", False),
                                  ("sources:none", "context", "sources", False)):
    case("plugins", f"{_table} plugin {_b}: validate")(_validate_case(_b, _table, _method, _ran))
    case("plugins", f"{_table} plugin {_b}: plan")(_plugin_case(_b, _table, "plan", _method))


def _json_mode(behaviour: str, command: str, table: str | None = None):
    def make(d: Path):
        env = plugin_env(d, behaviour)
        recipe = plugin_recipe(d, table)
        if command == "eval":
            cmd = contsup("eval", str(copy_run("fin", d)), "--json")
        elif command == "plugins":
            cmd = contsup("plugins", "--json")
        else:
            cmd = contsup(command, str(recipe), "--json")

        def judge(r, d):
            if r["exit"] != 0:
                return refusal(r, "evil")
            try:
                json.loads(r["stdout"])
            except ValueError:
                return "silent", "exit 0 but stdout is not JSON"
            return "held", ""
        return cmd, {"env": env}, judge
    return make


for _b in ("import:print", "import:fdprint", "register:print"):
    for _cmd in ("plan", "eval", "plugins"):
        case("plugins", f"{_b}: {_cmd} --json")(_json_mode(_b, _cmd))
case("plugins", "info:print: plan --json")(_json_mode("info:print", "plan", "data"))
case("plugins", "sources:print: plan --json")(_json_mode("sources:print", "plan", "context"))


def _import_exit(behaviour: str, command: str):
    def make(d: Path):
        env = plugin_env(d, behaviour)
        recipe = plugin_recipe(d, None)
        cmd = contsup(command, str(recipe))

        def judge(r, d):
            named = any(line.startswith("warning:") and "evil" in line for line in r["stderr"].splitlines())
            if r["exit"] == 0 and (": ok (" in r["stdout"] or command != "validate") and named:
                return "held", ""
            if r["exit"] == 0:
                return "silent", "exit 0 " + ("without validating" if ": ok (" not in r["stdout"] else "and the plugin not named")
            return "unclear", f"exit {r['exit']}: " + (error_lines(r["stderr"]) or ["no line"])[0][:120]
        return cmd, {"env": env}, judge
    return make


for _b in ("import:exit3", "import:exit0", "import:raise", "register:raise"):
    case("plugins", f"{_b}: validate (a recipe not using it)")(_import_exit(_b, "validate"))
case("plugins", "import:exit3: plan (a recipe not using it)")(_import_exit("import:exit3", "plan"))


# ---- API argument types --------------------------------------------------------------------------------

API = """
import json, sys, contsup
def one_line(exc):
    for line in exc.lines:
        print(f"error: {line}", file=sys.stderr)
    sys.exit(exc.exit_code)
"""


def _api(call: str, keyword: str, needs: str = "recipe", none_ok: bool = False):
    """A call with an argument of the wrong type: one line naming the argument (``keyword``), or,
    with ``none_ok`` (None for a list), a call that works."""
    def make(d: Path):
        recipe = d / "r.toml"
        recipe.write_text(tiny(d / "run", epochs=1))
        run_dir = copy_run("fin", d, to="done") if needs == "run" else d / "none"
        before = snapshot(run_dir) if needs == "run" else None
        code = API + f"""
        R, RUN = sys.argv[1], sys.argv[2]
        try:
            result = {call}
        except contsup.ContsupError as exc:
            one_line(exc)
        print("returned", type(result).__name__)
        """
        dirs = (run_dir,) if before is not None else ()
        if none_ok:
            return script(code, str(recipe), str(run_dir)), {}, lambda r, d: either(
                r, lambda: None if "returned" in r["stdout"] else "no result", keyword, before=before, dirs=dirs)
        return script(code, str(recipe), str(run_dir)), {}, lambda r, d: refusal(
            r, keyword, before=before, dirs=dirs, single=True)
    return make


API_CASES = [
    ("contsup.train(123)", "recipe"), ("contsup.train({'run': {'epochs': 1}})", "recipe"), ("contsup.train([R])", "recipe"),
    ("contsup.train(R, overrides='run.epochs=1')", "overrides"),
    ("contsup.train(R, overrides=[1, 2])", "overrides"), ("contsup.train(R, overrides=[None])", "overrides"),
    ("contsup.train(R, overrides={'run.epochs': 1})", "overrides"), ("contsup.train(R, out_dir=123)", "out_dir"),
    ("contsup.train(R, out_dir=['x'])", "out_dir"), ("contsup.train(resume=123)", "resume"),
    ("contsup.train(resume=[RUN])", "resume"), ("contsup.train(R, new='no')", "new"), ("contsup.load_recipe(None)", "path"),
    ("contsup.load_recipe(123)", "path"), ("contsup.load_recipe(R, overrides='run.epochs=2')", "overrides"),
    ("contsup.build_network(123)", "recipe"), ("contsup.build_network(R, overrides=5)", "overrides"),
    ("contsup.evaluate(123)", "run"), ("contsup.evaluate(None)", "run"), ("contsup.load_model(None)", "run_dir"),
    ("contsup.load_model(123)", "run_dir"),
]
for _call, _kw in API_CASES:
    case("api", _call)(_api(_call, _kw))
for _call in ("contsup.train(R, overrides=None)", "contsup.load_recipe(R, overrides=None)"):
    case("api", _call)(_api(_call, "overrides", none_ok=True))
for _call, _kw in (("contsup.evaluate(RUN, data='root=x')", "data"), ("contsup.evaluate(RUN, data=[1])", "data"),
                   ("contsup.evaluate(RUN, device=5)", "device"), ("contsup.load_model(RUN, map_location=5)", "map_location"),
                   ("contsup.evaluate(__import__('torch').nn.Linear(2, 2))", "recipe")):
    case("api", _call)(_api(_call, _kw, needs="run"))
case("api", "contsup.evaluate(RUN, data=None)")(_api("contsup.evaluate(RUN, data=None)", "data", needs="run", none_ok=True))


# ---- sweeps ------------------------------------------------------------------------------------------------


def _sweep_file(d: Path, recipes: list[str], axes: dict, out_dir: str | None = None) -> Path:
    lines = ["[sweep]", "recipes = [" + ", ".join(json.dumps(r) for r in recipes) + "]",
             f"out_dir = {json.dumps(out_dir or str(d / 'sweep-runs'))}", "", "[axes]"]
    for key, values in axes.items():
        lines.append(f"{json.dumps(key)} = {json.dumps(values)}")
    path = d / "s.sweep.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _collision(kind: str):
    def make(d: Path):
        (d / "base.toml").write_text(tiny("", epochs=1, every=0))
        out = d / "sweep-runs"
        if kind == "duplicate values":
            sweep = _sweep_file(d, ["base.toml"], {"run.seed": [0, 0]})
        elif kind == "two recipes of one name":
            (d / "a").mkdir()
            (d / "b").mkdir()
            (d / "a" / "base.toml").write_text(tiny("", epochs=1, every=0))
            (d / "b" / "base.toml").write_text(tiny("", epochs=1, every=0).replace("lr = 0.05", "lr = 0.1"))
            sweep = _sweep_file(d, ["a/base.toml", "b/base.toml"], {"run.seed": [0]})
        elif kind == "values that read alike":
            _write_images(d / "imgs" / "v1", ["a", "b"], seed=1)
            _write_images(d / "imgs-v1", ["a", "b"], seed=2)
            (d / "base.toml").write_text(IMAGE_RECIPE.format(out_dir="", root=d / "imgs-v1").replace('out_dir = ""\n', ""))
            sweep = _sweep_file(d, ["base.toml"], {"data.root": ["imgs/v1", "imgs-v1"]})
        else:  # 1 and 1.0 are one value for a float option
            sweep = _sweep_file(d, ["base.toml"], {"run.seed": [1, 2, 1]})
        return contsup("sweep", str(sweep)), {}, lambda r, d: (
            ("silent", "trained into colliding run directories") if r["exit"] == 0 else
            refusal(r, "same run directory|collide|both", before={}, dirs=()) if not out.exists() or not any(out.rglob("model.pt"))
            else ("unclear", "refused after training"))
    return make


for _kind in ("duplicate values", "two recipes of one name", "values that read alike", "a value repeated later"):
    case("sweeps", f"sweep points colliding on one run directory: {_kind}")(_collision(_kind))


def _collision_dry(d: Path):
    (d / "base.toml").write_text(tiny("", epochs=1, every=0))
    sweep = _sweep_file(d, ["base.toml"], {"run.seed": [3, 3]})
    return contsup("sweep", str(sweep), "--dry-run"), {}, lambda r, d: refusal(r, "same run directory|collide|both")


case("sweeps", "sweep --dry-run with colliding points")(_collision_dry)


def _changed_base(finished: bool):
    def make(d: Path):
        (d / "base.toml").write_text(tiny("", epochs=1, every=0))
        sweep = _sweep_file(d, ["base.toml"], {"run.seed": [0]})
        first = run(contsup("sweep", str(sweep)), d, timeout=120)
        assert first["exit"] == 0, first["stderr"][-500:]
        runs = list((d / "sweep-runs").rglob("model.pt"))
        if not finished:
            for m in runs:
                m.unlink()
                m.with_name("model.pt.sha256").unlink()
        (d / "base.toml").write_text(tiny("", epochs=1, every=0).replace("lr = 0.05", "lr = 0.2"))
        before = snapshot(d / "sweep-runs")
        return contsup("sweep", str(sweep)), {}, lambda r, d: refusal(r, "optimizer.lr", before=before, dirs=(d / "sweep-runs",))
    return make


case("sweeps", "sweep rerun after its base recipe changed (runs finished)")(_changed_base(True))
case("sweeps", "sweep rerun after its base recipe changed (runs unfinished)")(_changed_base(False))


def _sweep_unchanged(d: Path):
    (d / "base.toml").write_text(tiny("", epochs=1, every=0))
    sweep = _sweep_file(d, ["base.toml"], {"run.seed": [0]})
    first = run(contsup("sweep", str(sweep)), d, timeout=120)
    assert first["exit"] == 0, first["stderr"][-500:]
    before = snapshot(d / "sweep-runs")
    return contsup("sweep", str(sweep)), {}, lambda r, d: success(r, lambda: None if snapshot(d / "sweep-runs") == before else "files changed")


case("sweeps", "sweep rerun with nothing changed")(_sweep_unchanged)


def _sweep_fifo(which: str):
    def make(d: Path):
        if which == "sweep":
            sweep = _fifo(d / "s.sweep.toml")
        else:
            _fifo(d / "base.toml")
            sweep = _sweep_file(d, ["base.toml"], {"run.seed": [0]})
        return contsup("sweep", str(sweep)), {}, lambda r, d: refusal(r, "s.sweep.toml" if which == "sweep" else "base.toml")
    return make


case("sweeps", "the sweep file is a FIFO")(_sweep_fifo("sweep"))
case("sweeps", "a sweep's recipe is a FIFO")(_sweep_fifo("recipe"))


def _sweep_tilde(d: Path):
    (d / "base.toml").write_text(tiny("", epochs=1, every=0))
    sweep = _sweep_file(d, ["base.toml"], {"run.seed": [0]}, out_dir="~/sw")
    home = d / "home"
    home.mkdir()
    return contsup("sweep", str(sweep)), {"env": base_env(HOME=str(home))}, lambda r, d: success(
        r, lambda: None if any((home / "sw").rglob("model.pt")) and not (d / "~").exists() else "not written under $HOME/sw")


case("sweeps", "sweep out_dir = \"~/sw\"")(_sweep_tilde)


def _sweep_bad_axis(d: Path):
    (d / "base.toml").write_text(tiny("", epochs=1, every=0))
    sweep = _sweep_file(d, ["base.toml"], {"optimizer.lr": [0.1, -1]})
    return contsup("sweep", str(sweep)), {}, lambda r, d: refusal(r, "optimizer.lr")


case("sweeps", "a sweep value no recipe takes")(_sweep_bad_axis)


# ---- environment -------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stale(variables: dict[str, str], ok: bool = False):
    def make(d: Path):
        recipe = d / "r.toml"
        recipe.write_text(tiny(d / "run", epochs=1, every=0))
        env = base_env(**{k: (str(_free_port()) if v == "PORT" else v) for k, v in variables.items()})
        if ok:
            return contsup("train", str(recipe)), {"env": env}, lambda r, d: either(
                r, lambda: None if (d / "run" / "model.pt").exists() else "no model", "WORLD_SIZE")
        return contsup("train", str(recipe)), {"env": env}, lambda r, d: refusal(r, "WORLD_SIZE")
    return make


case("env", "stale WORLD_SIZE=2 RANK=0 MASTER_ADDR MASTER_PORT")(_stale({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "PORT"}))
case("env", "stale WORLD_SIZE=2 RANK=1 MASTER_ADDR MASTER_PORT")(_stale({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "PORT"}))
case("env", "stale WORLD_SIZE=2 RANK=0 without MASTER_ADDR")(_stale({"WORLD_SIZE": "2", "RANK": "0"}))
case("env", "stale WORLD_SIZE=4 LOCAL_RANK=0 without RANK")(_stale({"WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "PORT"}))
case("env", "stale WORLD_SIZE=1 RANK=0")(_stale({"WORLD_SIZE": "1", "RANK": "0"}, ok=True))
case("env", "RANK=5 WORLD_SIZE=2")(lambda d: _stale({"WORLD_SIZE": "2", "RANK": "5"})(d)[:2] + (lambda r, d: refusal(r, "RANK"),))
case("env", "WORLD_SIZE=two")(_stale({"WORLD_SIZE": "two", "RANK": "0"}))


def _ulimit_n(n: int, workers: int):
    def make(d: Path):
        recipe = d / "r.toml"
        recipe.write_text(tiny(d / "run", epochs=1, every=0).replace("batch_size = 8", f"batch_size = 8\nworkers = {workers}"))
        return contsup("train", str(recipe)), {"nofile": n}, lambda r, d: either(
            r, lambda: None if (d / "run" / "model.pt").exists() else "no model", "open files|ulimit -n", exits=(1, 2))
    return make


for _n, _w in ((16, 2), (20, 2), (24, 2), (32, 2), (48, 4), (64, 8), (40, 0)):
    case("env", f"ulimit -n {_n} with data.workers = {_w}")(_ulimit_n(_n, _w))


def _ulimit_f(kib: int):
    def make(d: Path):
        recipe = d / "r.toml"
        recipe.write_text(tiny(d / "run", epochs=2, every=0))

        def judge(r, d):
            if r["exit"] == 0:
                return success(r, lambda: None if (d / "run" / "model.pt").exists() else "no model")
            first = refusal(r, "File too large|file size|ulimit -f", exits=(1,))
            if first[0] != "held":
                return first
            again = (contsup("train", "--resume", str(d / "run")) if (d / "run").exists() else contsup("train", str(recipe)))
            r2 = run(again, d, timeout=120)
            if r2["exit"] != 0:
                return "unclear", "once the limit is lifted, neither --resume nor the same command finishes the run"
            return "held", ""
        return contsup("train", str(recipe)), {"fsize": kib * 1024}, judge
    return make


for _k in (1, 100, 1000):
    case("env", f"ulimit -f {_k} (KiB) while training")(_ulimit_f(_k))


def _tilde(via: str):
    def make(d: Path):
        home = d / "home"
        home.mkdir()
        recipe = d / "r.toml"
        if via == "recipe":
            recipe.write_text(tiny("~/runs/x", epochs=1, every=0))
            cmd = contsup("train", str(recipe))
        else:
            recipe.write_text(tiny("", epochs=1, every=0).replace('out_dir = ""\n', ""))
            cmd = contsup("train", str(recipe), "--set", "run.out_dir=~/runs/x")
        return cmd, {"env": base_env(HOME=str(home))}, lambda r, d: either(
            r, lambda: None if (home / "runs" / "x" / "model.pt").exists() and not (d / "~").exists() else "wrote a literal ./~ folder",
            "~")
    return make


case("env", "out_dir = \"~/runs/x\" in the recipe")(_tilde("recipe"))
case("env", "--set run.out_dir=~/runs/x")(_tilde("set"))


def _tilde_resume(d: Path):
    home = d / "home"
    home.mkdir()
    shutil.copytree(FIX["mid"], home / "mid")
    return contsup("train", "--resume", "~/mid"), {"env": base_env(HOME=str(home))}, lambda r, d: either(
        r, lambda: None if (home / "mid" / "model.pt").exists() else "no model", "~")


case("env", "--resume ~/run (a literal ~)")(_tilde_resume)


def _tilde_eval(d: Path):
    home = d / "home"
    home.mkdir()
    shutil.copytree(FIX["fin"], home / "fin")
    return contsup("eval", "~/fin"), {"env": base_env(HOME=str(home))}, lambda r, d: either(r, lambda: None, "~")


case("env", "eval ~/run (a literal ~)")(_tilde_eval)


ASCII = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}


def _non_ascii(what: str):
    def make(d: Path):
        env = base_env(**ASCII)
        env.pop("PYTHONIOENCODING")
        if what == "recipe name":
            recipe = d / "réglage.toml"
            recipe.write_text(tiny(d / "run", epochs=1, every=0))
            return contsup("train", str(recipe)), {"env": env}, lambda r, d: success(
                r, lambda: None if (d / "run" / "model.pt").exists() else "no model")
        if what == "out_dir":  # a name the process cannot create: trained, or one line saying what to change
            recipe = d / "r.toml"
            recipe.write_text(tiny(d / "runs-é", epochs=1, every=0))
            return contsup("train", str(recipe)), {"env": env}, lambda r, d: either(
                r, lambda: None if (d / "runs-é" / "model.pt").exists() else "no model", "UTF-8|PYTHONUTF8")
        if what == "validate":
            recipe = d / "réglage.toml"
            recipe.write_text(tiny(d / "run", epochs=1, every=0))
            return contsup("validate", str(recipe)), {"env": env}, lambda r, d: success(r, lambda: None)
        if what == "error naming it":
            recipe = d / "réglage.toml"
            recipe.write_text(tiny(d / "run", epochs=1, every=0).replace("lr = 0.05", "lr = -1"))
            return contsup("validate", str(recipe)), {"env": env}, lambda r, d: refusal(r, "optimizer.lr")
        if what == "eval":
            run_dir = copy_run("fin", d, to="ränn")
            return contsup("eval", str(run_dir)), {"env": env}, lambda r, d: success(r, lambda: None)
        # results of a run in a non-ASCII folder
        run_dir = copy_run("fin", d, to="ränn")
        return contsup("results", str(run_dir)), {"env": env}, lambda r, d: success(r, lambda: None)
    return make


for _what in ("recipe name", "out_dir", "validate", "error naming it", "eval", "results"):
    case("env", f"non-ASCII {_what} under an ASCII locale")(_non_ascii(_what))


def _full_stdout(command: str):
    def make(d: Path):
        if command == "train":
            recipe = d / "r.toml"
            recipe.write_text(tiny(d / "run", epochs=1, every=0))

            def judge(r, d):
                if r["exit"] == 0:
                    return success(r, lambda: None if (d / "run" / "model.pt").exists() else "no model")
                first = refusal(r, "standard output|stdout", exits=(1,))
                if first[0] != "held":
                    return first
                r2 = run(contsup("train", "--resume", str(d / "run")) if (d / "run").exists() else contsup("train", str(recipe)), d)
                return ("held", "") if r2["exit"] == 0 else ("unclear", "the run directory left behind cannot be used")
            return contsup("train", str(recipe)), {"stdout": "full"}, judge
        run_dir = copy_run("fin", d)
        cmd = {"eval": contsup("eval", str(run_dir), "--json"), "results": contsup("results", str(run_dir)),
               "validate": contsup("validate", str(d / "r.toml")), "plan": contsup("plan", str(d / "r.toml"), "--json")}[command]
        (d / "r.toml").write_text(tiny(d / "run", epochs=1, every=0))
        return cmd, {"stdout": "full"}, lambda r, d: refusal(r, "standard output|stdout", exits=(1,))
    return make


for _c in ("train", "eval", "results", "validate", "plan"):
    case("env", f"{_c} with stdout on /dev/full")(_full_stdout(_c))


def _closed_stdout(d: Path):
    recipe = d / "r.toml"
    recipe.write_text(tiny(d / "run", epochs=1, every=0))
    code = "import os, sys, runpy; os.close(1); sys.argv = ['contsup', 'train', sys.argv[1]]; runpy.run_module('contsup', run_name='__main__')"
    return [sys.executable, "-c", code, str(recipe)], {}, lambda r, d: either(
        r, lambda: None if (d / "run" / "model.pt").exists() else "no model", "standard output|stdout", exits=(1,))


case("env", "train with stdout closed")(_closed_stdout)


# ---- exit statuses ------------------------------------------------------------------------------------------


def _exit_case(build: Callable[[Path], list[str]], keyword: str):
    def make(d: Path):
        return build(d), {}, lambda r, d: refusal(r, keyword)
    return make


case("exits", "results --csv into a missing folder")(_exit_case(lambda d: contsup("results", str(copy_run("fin", d)), "--csv", str(d / "no" / "x.csv")), "x.csv"))
case("exits", "results --markdown into a missing folder")(_exit_case(lambda d: contsup("results", str(copy_run("fin", d)), "--markdown", str(d / "no" / "x.md")), "x.md"))
case("exits", "weights -o into a missing folder")(
    lambda d: (contsup("weights", str(copy_run("fin", d)), "-o", str(d / "no" / "w.png")), {},
               lambda r, d: either(r, lambda: None if (d / "no" / "w.png").is_file() else "no figure", "w.png")))
case("exits", "report -o below a file")(_exit_case(lambda d: (copy_run("fin", d), (d / "f").write_text("x"), contsup("report", str(d / "run"), "-o", str(d / "f" / "rep")))[2], "rep"))
case("exits", "eval of a file")(_exit_case(lambda d: ((d / "f").write_text("x"), contsup("eval", str(d / "f")))[1], str("f")))
case("exits", "eval of a missing run")(_exit_case(lambda d: contsup("eval", str(d / "missing")), "missing"))
case("exits", "results of a missing folder")(_exit_case(lambda d: contsup("results", str(d / "missing")), "missing"))
case("exits", "sweep of a missing file")(_exit_case(lambda d: contsup("sweep", str(d / "missing.toml")), "missing.toml"))
case("exits", "weights of a missing run")(_exit_case(lambda d: contsup("weights", str(d / "missing")), "missing"))
case("exits", "probe of a missing run")(_exit_case(lambda d: contsup("probe", str(d / "missing")), "missing"))
case("exits", "--resume of a missing run")(_exit_case(lambda d: contsup("train", "--resume", str(d / "missing")), "missing"))
case("exits", "train with out_dir below a file")(_exit_case(lambda d: ((d / "f").write_text("x"), (d / "r.toml").write_text(tiny(d / "f" / "run", epochs=1)), contsup("train", str(d / "r.toml")))[2], "run"))
case("exits", "eval --device cuda:7 (no such device)")(_exit_case(lambda d: contsup("eval", str(copy_run("fin", d)), "--device", "cuda:7"), "cuda"))


# -- fixtures -------------------------------------------------------------------------------------------------


def build_fixtures(work: Path) -> None:
    fx = work / "fixtures"
    if fx.exists():
        shutil.rmtree(fx)
    fx.mkdir(parents=True)
    kill_env = dict(base_env(), PYTHONPATH=str(PRELOAD))
    jobs = {
        "fin": (tiny(fx / "fin", every=1), {}),
        "end1": (tiny(fx / "end1", every=0), {"ATTACK_HOOK": "step:5"}),
        "mid": (tiny(fx / "mid", every=1), {"ATTACK_HOOK": "step:7"}),
    }
    for name, (text, hook) in jobs.items():
        recipe = fx / f"{name}.toml"
        recipe.write_text(text)
        r = run(contsup("train", str(recipe)), fx, env=dict(kill_env, **hook) if hook else base_env(), timeout=300)
        if hook and r["exit"] != -signal.SIGKILL or not hook and r["exit"] != 0:
            raise SystemExit(f"attack_edges: fixture {name} failed (exit {r['exit']}): {r['stderr'][-800:]}")
        FIX[name] = fx / name
    img = fx / "img"
    _write_images(img / "imgs", ["a", "b"], seed=0)
    (img / "r.toml").write_text(IMAGE_RECIPE.format(out_dir="run", root="imgs"))
    r = run(contsup("train", "r.toml"), img, timeout=300)
    if r["exit"] != 0:
        raise SystemExit(f"attack_edges: the image fixture failed: {r['stderr'][-800:]}")
    FIX["img"] = img


def run_case(c: Case, work: Path, index: int, timeout: float) -> dict:
    d = work / "cases" / f"{index:03d}-{re.sub(r'[^A-Za-z0-9]+', '-', c.name)[:60]}"
    d.mkdir(parents=True)
    start = time.monotonic()
    try:
        cmd, opts, judge = c.make(d)
    except Exception as exc:  # a harness problem, not contsup's: reported, not counted
        return {"family": c.family, "case": c.name, "outcome": "setup-failed", "why": f"{type(exc).__name__}: {exc}"}
    cwd = opts.pop("cwd", d)
    r = run(cmd, cwd, env=opts.pop("env", None), timeout=timeout, **opts)
    if r["timed_out"]:
        outcome, why = "hang", f"no answer in {timeout:.0f} s"
    elif has_traceback(r):
        tb = [line for line in (r["stderr"] + r["stdout"]).splitlines() if line.strip() and not line.startswith(" ")]
        outcome, why = "traceback", (tb[-1] if tb else "")[:200]
    else:
        try:
            outcome, why = judge(r, d)
        except Exception as exc:
            outcome, why = "unclear", f"judge failed: {type(exc).__name__}: {exc}"
    shown = " ".join("contsup" if x == sys.executable else x for x in cmd if x != "-m").replace("contsup contsup", "contsup")
    return {"family": c.family, "case": c.name, "command": shown[:300], "exit": r["exit"], "outcome": outcome, "why": why,
            "stderr": [line for line in r["stderr"].splitlines() if line.strip()][:4], "seconds": round(time.monotonic() - start, 1)}


def counts(results: list[dict]) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for res in results:
        if res["outcome"] == "setup-failed":
            continue
        for key in (res["family"], "all"):
            row = table.setdefault(key, {"tried": 0, **dict.fromkeys(OUTCOMES, 0)})
            row["tried"] += 1
            row[res["outcome"]] += 1
    return table


def markdown(results: list[dict], seconds: float) -> str:
    table = counts(results)
    cols = ("tried", *OUTCOMES)
    lines = [f"# contsup edge attack ({table.get('all', {}).get('tried', 0)} cases, {seconds:.0f} s)", "",
             "| family | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for fam in (*FAMILIES, "all"):
        if fam in table:
            lines.append(f"| {fam} | " + " | ".join(str(table[fam][c]) for c in cols) + " |")
    bad = [r for r in results if r["outcome"] != "held"]
    lines += ["", f"## Not held ({len(bad)})", ""]
    for r in bad:
        err = r.get("stderr") or [""]
        lines.append(f"- {r['family']}: {r['case']}: **{r['outcome']}** (exit {r.get('exit')}) {r.get('why', '')}"
                     + (f" — `{err[-1][:160]}`" if err and err[-1] else ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="output folder (edges.json, edges.md, the cases' folders)")
    p.add_argument("--only", default="", help=f"comma-separated families: {','.join(FAMILIES)}")
    p.add_argument("--match", default="", help="only cases whose name contains this text")
    p.add_argument("--case", action="append", default=[], metavar="NAME", help="only this case, by its exact name (repeatable)")
    p.add_argument("--merge", type=Path, metavar="EDGES_JSON",
                   help="an earlier run's edges.json: its results, with the cases run now replacing theirs, make the table")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=90.0, help="seconds per case before it counts as a hang")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--fixtures", type=Path, metavar="DIR",
                   help="reuse the fixture runs of an earlier attack (its OUT/work/fixtures) instead of training them again")
    args = p.parse_args(argv)
    only = set(filter(None, args.only.split(","))) or set(FAMILIES)
    chosen = [(i, c) for i, c in enumerate(CASES) if c.family in only and args.match in c.name
              and (not args.case or c.name in args.case)]
    if args.list:
        for i, c in chosen:
            print(f"{i:3d} {c.family:8s} {c.name}")
        print(f"{len(chosen)} cases")
        return 0
    if args.out is None:
        p.error("--out is required")
    out = args.out.resolve()
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    began = time.monotonic()
    if args.fixtures is not None:
        for name in ("fin", "end1", "mid", "img"):
            FIX[name] = args.fixtures.resolve() / name
    else:
        build_fixtures(work)
    print(f"attack_edges: fixtures built ({time.monotonic() - began:.0f} s); {len(chosen)} cases", file=sys.stderr, flush=True)
    results: list[dict] = []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_case, c, work, i, args.timeout): i for i, c in chosen}
        for f in concurrent.futures.as_completed(futures):
            res = f.result()
            results.append(res)
            print(f"  [{len(results)}/{len(chosen)}] {res['outcome']:9s} {res['family']}: {res['case']}", file=sys.stderr, flush=True)
            (out / "edges.json").write_text(json.dumps({"partial": True, "results": results}, indent=1))
    seconds = time.monotonic() - began
    if args.merge is not None:
        earlier = json.loads(args.merge.read_text())
        now = {(r["family"], r["case"]) for r in results}
        results = [r for r in earlier["results"] if (r["family"], r["case"]) not in now] + results
        seconds += earlier.get("seconds", 0.0)
    order = {(c.family, c.name): i for i, c in enumerate(CASES)}
    results.sort(key=lambda r: order.get((r["family"], r["case"]), len(order)))
    (out / "edges.json").write_text(json.dumps({"seconds": round(seconds, 1), "results": results}, indent=1))
    md = markdown(results, seconds)
    (out / "edges.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

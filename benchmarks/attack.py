"""Attack contsup as users do in bad moments, through the real CLI, and count what held.

Usage::

    python benchmarks/attack.py --out attack-out            # everything (about 20 min on 2 cores)
    python benchmarks/attack.py --out attack-out --quick    # a seeded subset (about 3 min)
    python benchmarks/attack.py --out attack-out --only kills,signals

Every case runs ``python -m contsup ...`` in a subprocess on a tiny digits recipe
(``recipes/digits.toml`` with 8x8 images, ResNet-20 in 4 modules) and is classified:

- malformed input: recipe files and ``--set`` overrides through ``validate`` and ``train``:
  ``clean`` (exit 2, one ``error:`` line, no traceback), ``multiline`` (exit 2 but more than one
  line, or a literal ``\\n``), ``traceback``, ``other`` (any other exit status), ``hang``
  (timeout) or ``trained`` (accepted and trained);
- kills: SIGKILL at chosen points (a preload, ``benchmarks/attack_preload/sitecustomize.py``,
  kills the process at a step, inside a step, in evaluation, mid-write of a checkpoint or of
  model.pt, before their rename, while pruning, at a metrics write) and a seeded fraction of a
  second after seeded steps spread
  over the run, then ``--resume``: survived, bit-exact with an uninterrupted run (model.pt state
  dicts and metrics.jsonl less timings), steps redone beyond the checkpoint interval, leftovers;
- signals: SIGINT, SIGTERM, SIGHUP to the process and to its process group, with data.workers 0
  and 2: exit status, a stop checkpoint, resume bit-exact;
- concurrent launches on one run directory: the loser exits 2 naming the holder, epochs in
  metrics.jsonl strictly increasing, the result bit-exact;
- damaged files (truncated, one flipped bit, replaced by a directory, deleted) then ``eval``,
  ``results``, ``report`` (on the files they read), ``--resume`` and ``load_model``: ``clean``,
  ``unaffected`` (output as on the intact run), ``warned`` (a warning line says what it could
  not trust), ``repaired`` (resume bit-exact) or ``silent`` (different output, no word: corrupt
  data used);
- full disk (a tmpfs of a few MB as run.out_dir, mounted in ``unshare -rm``) and read-only run
  directories (a read-only bind mount: this machine runs as root, which ``chmod -w`` does not stop);
- malicious pickles (``__reduce__`` creating a marker file) as model.pt or a checkpoint on every
  load path: the marker must stay absent and the error be one line.

Writes ``OUT/attack.json`` (every case: category, case, input, command, exit, outcome, first
stderr line, details) and ``OUT/attack.md`` (counts per category), and prints the table. The
choices (sampled cases, kill times) are seeded; kill times land differently on a busy machine.
Subprocesses run with OMP_NUM_THREADS=1, two at a time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = Path(__file__).resolve().parent / "attack_preload"
RECIPE = ROOT / "recipes" / "digits.toml"
TINY = ["data.size=8", "backbone.use=cifar_resnet20", "partition.modules=4"]
EVERY = 5  # run.checkpoint_every_steps of the kill, signal and damage runs
LONG = TINY + ["run.epochs=2", f"run.checkpoint_every_steps={EVERY}"]  # 2 epochs of 23 steps
MEASURED = ("images_per_s", "epoch_time_s", "peak_memory_bytes")
STOP_EXITS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
MEMORY_LIMIT = 6 << 30  # bytes of address space for training malformed recipes (a shared machine)


# -- classifying one command's outcome (tests/test_attack.py runs these on canned outputs) ------


def error_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not warnings, progress or blank."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning:")]


def first_line(stderr: str) -> str:
    """The first error line; for a traceback, its last line (the exception)."""
    lines = error_lines(stderr) or [line for line in stderr.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in stderr:
        lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(" ")][-1:]
    return lines[0][:300] if lines else ""


def unsafe_advice(stderr: str) -> bool:
    """torch's advice to load with weights_only=False (what a malicious pickle needs), or terminal
    escape codes, passed on in a message."""
    return ("weights_only" in stderr and "False" in stderr) or "\x1b" in stderr or "\\x1b" in stderr


def classify(exit_code: int | None, stderr: str, timed_out: bool = False, accepted: str = "trained",
             clean_exits: tuple[int, ...] = (2,)) -> str:
    """One command's outcome: ``hang``, ``traceback``, ``clean`` (an exit status in
    ``clean_exits`` and every line an ``error:`` line of its own, without a literal ``\\n``: one
    problem, or several each on its line), ``multiline`` (such an exit otherwise), ``accepted``
    (exit 0: the name passed in, e.g. ``trained``) or ``other`` (any other exit status). Bad input
    exits 2; a write the machine refuses (full disk, read-only) exits 1, so those cases pass
    ``clean_exits=(1, 2)``."""
    if timed_out:
        return "hang"
    if "Traceback (most recent call last)" in stderr:
        return "traceback"
    if exit_code == 0:
        return accepted
    if exit_code in clean_exits:
        lines = error_lines(stderr)
        if lines and all(line.startswith("error: ") for line in lines) and "\\n" not in stderr:
            return "clean"
        return "multiline"
    return "other"


def classify_damage(exit_code: int | None, stderr: str, stdout: str, intact_stdout: str, timed_out: bool = False) -> str:
    """A command on a damaged run: as :func:`classify` when it fails; when it succeeds,
    ``warned`` (a warning line says what it could not trust), ``unaffected`` (no warning, the
    same output as on the intact run) or ``silent`` (no warning, a different output: damaged
    data used as if sound)."""
    outcome = classify(exit_code, stderr, timed_out, accepted="ok")
    if outcome != "ok":
        return outcome
    if any(line.startswith("warning:") for line in stderr.splitlines()):
        return "warned"
    return "unaffected" if stdout == intact_stdout else "silent"


def without_measured(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in MEASURED} for m in metrics]


def strictly_increasing(epochs: list[int]) -> bool:
    return all(a < b for a, b in zip(epochs, epochs[1:]))


def steps_lost(done_at_kill: int, resumed_from: int, interval: int) -> int:
    """Steps redone beyond what the checkpoint interval allows (0: no more than an interval)."""
    return max(0, done_at_kill - resumed_from - interval)


# -- running commands ----------------------------------------------------------------------------


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("ATTACK_HOOK", None)
    e.pop("ATTACK_STEPS", None)
    if extra:
        e["PYTHONPATH"] = os.pathsep.join([str(PRELOAD)] + [p for p in [os.environ.get("PYTHONPATH", "")] if p])
        e.update(extra)
    return e


def contsup(*args: str) -> list[str]:
    return [sys.executable, "-m", "contsup", *args]


def limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run(cmd: list[str], timeout: float = 180, cwd: Path | None = None, environ: dict | None = None,
        limit: bool = False) -> dict:
    """Run ``cmd``; its exit status (None on a timeout), stdout, stderr and wall time."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                            cwd=cwd or ROOT, env=environ or env(), start_new_session=True,
                            preexec_fn=limit_memory if limit else None)
    try:
        out, err = proc.communicate(timeout=timeout)
        code, timed_out = proc.returncode, False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        code, timed_out = None, True
    return {"cmd": cmd, "exit": code, "stdout": out, "stderr": err, "timed_out": timed_out,
            "seconds": round(time.monotonic() - start, 2)}


def shown(cmd: list[str]) -> str:
    return " ".join(["contsup" if c == sys.executable else c for c in cmd if c not in ("-m",)]).replace("contsup contsup", "contsup")


def case(category: str, name: str, inp: str, r: dict | None, outcome: str, **details) -> dict:
    return {
        "category": category, "case": name, "input": inp,
        "command": shown(r["cmd"]) if r else "", "exit": r["exit"] if r else None,
        "outcome": outcome, "stderr": first_line(r["stderr"]) if r else "",
        "error_lines": len(error_lines(r["stderr"])) if r else 0,
        "unsafe_advice": unsafe_advice(r["stderr"]) if r else False, **details,
    }


def train_cmd(out: Path, sets: list[str], *extra: str) -> list[str]:
    return contsup("train", str(RECIPE), *[a for s in sets + [f"run.out_dir={out}"] for a in ("--set", s)], *extra)


# -- comparing runs --------------------------------------------------------------------------------


def fingerprint(run_dir: Path) -> dict | None:
    """SHA-256 of each model.pt tensor and metrics.jsonl less timings; None when the run has no
    readable model.pt."""
    import torch

    try:
        sd = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
        weights = {k: hashlib.sha256(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
                   for k, v in sd.items()}
    except Exception:  # any damage: not comparable
        return None
    try:
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        metrics = None
    return {"weights": weights, "metrics": without_measured(metrics) if metrics is not None else None}


class References:
    """Uninterrupted runs, one per list of overrides, trained once."""

    def __init__(self, root: Path) -> None:
        self.root, self.done, self.lock = root, {}, threading.Lock()

    def get(self, sets: list[str]) -> dict:
        key = "|".join(sets)
        with self.lock:
            return self._get(key, sets)

    def _get(self, key: str, sets: list[str]) -> dict:
        if key not in self.done:
            out = self.root / f"ref-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
            shutil.rmtree(out, ignore_errors=True)
            r = run(train_cmd(out, sets), timeout=600)
            if r["exit"] != 0:
                raise SystemExit(f"attack: the reference run failed: {first_line(r['stderr'])}")
            self.done[key] = {"dir": out, "print": fingerprint(out), "seconds": r["seconds"]}
        return self.done[key]


def leftovers(run_dir: Path) -> list[str]:
    """Temporary files and digests without their file, after a run completed."""
    found = []
    for p in run_dir.rglob("*"):
        if p.name.endswith(".tmp") or (p.name.endswith(".sha256") and not p.with_name(p.name[:-7]).exists()):
            found.append(str(p.relative_to(run_dir)))
    return sorted(found)


def read_steps(path: Path) -> list[int]:
    try:
        return [int(x) for x in path.read_text().split()]
    except (OSError, ValueError):
        return []


def newest_checkpoint_step(run_dir: Path) -> int:
    steps = [int(m.group(1)) for p in (run_dir / "checkpoints").glob("step-*.pt") if (m := re.match(r"step-(\d+)\.pt$", p.name))]
    return max(steps, default=0)


def compare(run_dir: Path, ref: dict) -> bool:
    got = fingerprint(run_dir)
    return got is not None and got == ref["print"]


# -- malformed input -----------------------------------------------------------------------------


def tiny_text() -> str:
    text = RECIPE.read_text()
    for old, new in (("epochs = 8", "epochs = 1"), ("size = 16", "size = 8"), ('"cifar_resnet32"', '"cifar_resnet20"'),
                     ("modules = 16", "modules = 4")):
        assert old in text, old
        text = text.replace(old, new)
    return text


def malformed_cases() -> list[dict]:
    """Each: name, and either ``sets`` (overrides of the tiny recipe) or ``text``/``make`` (a file)."""
    cases: list[dict] = []

    def s(name, *sets):
        cases.append({"name": name, "sets": list(sets)})

    def t(name, text):
        cases.append({"name": name, "text": text})

    def m(name, make, sets=()):
        cases.append({"name": name, "make": make, "sets": list(sets)})

    for key, values in {
        "run.seed": ["18446744073709551616", "-1", "-9223372036854775809", "1.5", '"zero"', "true", "[]", "1e400"],
        "run.epochs": ["0", "-3", "1e21", "2.5", '"2"', "100000000000000000000000", "nan", "inf"],
        "run.checkpoint_every_steps": ["-1", "1e30", '"x"'],
        "run.log_every": ["-5", "1.5"],
        "run.device": ['"gpu"', '"cuda:99"', '"tpu"', "3"],
        "run.precision": ['"fp8"', '"fp16"'],
        "run.mode": ['"pipelined"', "1"],
        "optimizer.lr": ["1e308", "1e39", "-0.1", "0", "nan", "inf", '"fast"', "1e-320"],
        "optimizer.momentum": ["-1", "2", '"x"'],
        "optimizer.weight_decay": ["-1", "1e309"],
        "optimizer.use": ['"adamw9"', "5"],
        "schedule.warmup_epochs": ["1e9", "-1", "2.5", "1e21"],
        "schedule.use": ['"linearish"'],
        "data.size": ["0", "-8", "4096", "1e9", "7.5", '"big"'],
        "data.batch_size": ["0", "-1", "1e12", "100000000", "1.5"],
        "data.test_fraction": ["0", "1", "-0.5", "2", "nan"],
        "data.split_seed": ["-1", "18446744073709551616", "4294967296"],
        "data.workers": ["-1", "1e6", '"two"'],
        "data.use": ['"digitz"', '""', "[]"],
        "partition.modules": ["0", "-1", "17", "1e6", "11"],
        "partition.use": ['"magic"'],
        "backbone.use": ['"resnet9000"', '""'],
        "context.use": ['"R9"', '"R1E R2"'],
        "objective.use": ['"mse"'],
    }.items():
        for v in values:
            s(f"{key}={v}", f"{key}={v}")
    s("unknown key", "run.speed=3")
    s("typo in a section", "optimiser.lr=0.1")
    s("value with spaces", "run.out_dir= ")
    s("key with spaces", " run.seed =1")
    s("hex seed", "run.seed=0x10")
    s("batch_size true", "data.batch_size=true")
    s("lr as a list", "optimizer.lr=[0.1]")
    s("unknown section", "turbo.on=true")
    s("unknown key in data", "data.colour=1")
    s("deep dotted key", "run." + ".".join(["a"] * 300) + "=1")
    s("no value", "run.seed")
    s("empty key", "=3")
    s("bad TOML value", "run.seed=[1,")
    s("extends via --set", f"extends={RECIPE}")
    s("extends via --set missing", "extends=/nonexistent.toml")
    s("out_dir under /proc", "run.out_dir=/proc/contsup-attack/run")
    s("shape on digits", "data.shape=[3,100000,100000]")
    s("head width huge", "data.classes=1000000000")
    s("nested table as value", "run={seed=1}")

    base = tiny_text()
    t("bad TOML: unclosed table", base + "\n[run\n")
    t("bad TOML: duplicate key", base.replace("seed = 0", "seed = 0\nseed = 1"))
    t("bad TOML: duplicate table", base + "\n[run]\nseed = 2\n")
    t("bad TOML: unterminated string", base.replace('"digits"', '"digits'))
    t("bad TOML: bare word", base.replace("seed = 0", "seed = zero"))
    t("UTF-8 BOM", "\ufeff" + base)
    t("NUL byte", base.replace("[data]", "[data]\x00"))
    t("latin-1 byte", base + "# caf\udce9\n")  # written with surrogateescape: byte 0xE9, not UTF-8
    t("empty file", "")
    t("only comments", "# nothing here\n")
    t("no [run]", re.sub(r"\[run\]\nseed = 0\nepochs = 1\n", "", base))
    t("no data.use", base.replace('use = "digits"\n', ""))
    t("no backbone", base.replace('[backbone]\nuse = "cifar_resnet20"\n', ""))
    t("unknown section", base + "\n[turbo]\non = true\n")
    t("unknown component", base.replace('"R1E"', '"R42"'))
    t("seed 2**64", base.replace("seed = 0", "seed = 18446744073709551616"))
    t("epochs 1e21", base.replace("epochs = 1", "epochs = 1e21"))
    t("lr 1e308", base.replace("lr = 0.05", "lr = 1e308"))
    t("size negative", base.replace("size = 8", "size = -8"))
    t("batch zero", base.replace("batch_size = 64", "batch_size = 0"))
    t("split_seed -1", base.replace("batch_size = 64", "batch_size = 64\nsplit_seed = -1"))
    t("array of tables run", base.replace("[run]", "[[run]]"))
    t("string where table", 'run = "fast"\n' + base.replace("[run]\n", "[run_]\n"))
    t("deep inline table", base + "\nx = " + "{a = " * 200 + "1" + "}" * 200 + "\n")
    t("deep inline array", base + "\nx = " + "[" * 300 + "]" * 300 + "\n")
    t("deep dotted table", base + "\n[" + ".".join(["t"] * 400) + "]\n")
    t("huge integer", base.replace("seed = 0", "seed = " + "9" * 5000))
    t("float epochs", base.replace("epochs = 1", "epochs = 1.0"))
    t("bool epochs", base.replace("epochs = 1", "epochs = true"))
    t("date seed", base.replace("seed = 0", "seed = 1979-05-27"))
    t('extends = ""', 'extends = ""\n' + base)
    t("extends a directory", f'extends = "{ROOT / "recipes"}"\n' + base)
    t("extends missing", 'extends = "nowhere.toml"\n' + base)
    t("extends a list", 'extends = ["a.toml"]\n' + base)
    t("extends itself", 'extends = "SELF"\n' + base)
    t("extends a sweep", f'extends = "{next(iter(sorted((ROOT / "recipes" / "sweeps").glob("*.toml"))), RECIPE)}"\n' + base)
    t("[[modules]] nonsense", base + '\n[[modules]]\ncount = -1\n')
    t("[[modules]] too many", base + '\n[[modules]]\ncount = 9\n')
    t("requires a missing plugin", base.replace("[run]", '[run]\nrequires = ["contsup-nonexistent>=9"]'))
    t("requires bad spec", base.replace("[run]", '[run]\nrequires = ["!!!"]'))

    def symlink_loop(d: Path) -> Path:
        a, b = d / "loop-a.toml", d / "loop-b.toml"
        a.symlink_to(b)
        b.symlink_to(a)
        return a

    def directory(d: Path) -> Path:
        (d / "dir.toml").mkdir()
        return d / "dir.toml"

    def missing(d: Path) -> Path:
        return d / "missing.toml"

    def unreadable_fifo(d: Path) -> Path:
        return d / "recipe.toml"  # a plain file below; a fifo would block the reader

    def deep_extends(n: int):
        def make(d: Path) -> Path:
            for i in range(n):
                (d / f"e{i}.toml").write_text((f'extends = "e{i + 1}.toml"\n' if i + 1 < n else "") + (base if i + 1 == n else ""))
            return d / "e0.toml"
        return make

    def extends_cycle(d: Path) -> Path:
        (d / "c1.toml").write_text('extends = "c2.toml"\n' + base)
        (d / "c2.toml").write_text('extends = "c1.toml"\n')
        return d / "c1.toml"

    def out_dir_file(d: Path) -> Path:
        (d / "a-file").write_text("x")
        (d / "r.toml").write_text(base)
        return d / "r.toml"

    def binary(d: Path) -> Path:
        (d / "r.toml").write_bytes(bytes(range(256)) * 4)
        return d / "r.toml"

    m("symlink loop", symlink_loop)
    m("recipe is a directory", directory)
    m("recipe missing", missing)
    m("extends chain 3", deep_extends(3))
    m("extends chain 300", deep_extends(300))
    m("extends cycle", extends_cycle)
    m("binary file", binary)
    m("out_dir is a file", out_dir_file, sets=["run.out_dir=OUT/a-file"])
    m("out_dir inside a file", out_dir_file, sets=["run.out_dir=OUT/a-file/run"])
    return cases


def malformed_one(c: dict, work: Path, train_it: bool, index: int = 0) -> list[dict]:
    d = work / f"{index:03d}-{re.sub(r'[^A-Za-z0-9]+', '-', c['name'])[:60]}"
    d.mkdir(parents=True)
    sets = [x.replace("OUT", str(d)) for x in c.get("sets", [])]
    if "text" in c:
        path = d / "recipe.toml"
        path.write_text(c["text"].replace("SELF", str(path)), encoding="utf-8", errors="surrogateescape")
        inp = f"file: {c['name']}"
    elif "make" in c:
        path = c["make"](d)
        inp = f"file: {c['name']}"
    else:
        path = d / "recipe.toml"
        path.write_text(tiny_text())
        inp = "--set " + " --set ".join(sets)
    if not any(x.startswith("run.out_dir=") for x in sets):
        sets = sets + [f"run.out_dir={d / 'run'}"]
    args = [a for x in sets for a in ("--set", x)]
    out = []
    r = run(contsup("validate", str(path), *args), timeout=120)
    v = classify(r["exit"], r["stderr"], r["timed_out"], accepted="valid")
    out.append(case("malformed", c["name"], inp, r, v, step="validate", literal_newline="\\n" in r["stderr"]))
    if train_it or v != "clean":
        r = run(contsup("train", str(path), *args), timeout=150, limit=True)  # a tiny epoch takes seconds
        o = classify(r["exit"], r["stderr"], r["timed_out"])
        out.append(case("malformed", c["name"], inp, r, o, step="train", literal_newline="\\n" in r["stderr"],
                        validated=v))
    return out


# -- kills -----------------------------------------------------------------------------------------


def kill_points(ref_seconds: float, rng: random.Random, quick: bool) -> list[tuple[str, str, float]]:
    """(name, ATTACK_HOOK, seconds): a preload kill point, or a SIGKILL after ``seconds``."""
    points = [
        ("first step (inside, module 2)", "backward:2", 0),
        ("step 1 done", "step:1", 0),
        ("mid-epoch, before a checkpoint (step 10)", "step:10", 0),
        ("mid-epoch, after a checkpoint (step 12)", "step:12", 0),
        ("last step of epoch 1", "step:23", 0),
        ("evaluation of epoch 1", "eval:1", 0),
        ("evaluation of epoch 2 (last)", "eval:2", 0),
        ("metrics.jsonl write, epoch 1", "metrics:1", 0),
        ("checkpoint write, first", "write:step-:1", 0),
        ("checkpoint write, fourth", "write:step-:4", 0),
        ("checkpoint rename (digest in place), second", "rename:step-:2", 0),
        ("pruning the first old checkpoint", "prune:1", 0),
        ("pruning, fifth", "prune:5", 0),
        ("model.pt write", "write:model.pt:1", 0),
        ("model.pt rename (digest in place)", "rename:model.pt:1", 0),
        ("last step of the run", "step:46", 0),
    ]
    if quick:
        points = [points[i] for i in (2, 8)]
    # seeded points over the run's 46 steps, each a seeded fraction of a second after its step
    # (counted, not timed from the start: the start takes from 5 s to 30 s on a busy machine)
    times = sorted((rng.randint(1, 46), round(rng.uniform(0.0, 0.4), 2)) for _ in range(1 if quick else 6))
    return points + [(f"SIGKILL {d:.2f}s after step {n}", "", n + d) for n, d in times]


def kill_one(name: str, hook: str, after: float, work: Path, refs: References) -> dict:
    ref = refs.get(LONG)
    d = work / re.sub(r"[^A-Za-z0-9]+", "-", name)[:60]
    d.mkdir(parents=True)
    out, steps1, steps2 = d / "run", d / "steps-killed", d / "steps-resumed"
    cmd = train_cmd(out, LONG)
    if hook:
        r1 = run(cmd, timeout=300, environ=env(ATTACK_HOOK=hook, ATTACK_STEPS=str(steps1)))
    else:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env=env(ATTACK_STEPS=str(steps1)), start_new_session=True)
        step, delay = int(after), after - int(after)
        wait_steps(steps1, step, proc)
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        o, e = proc.communicate()
        r1 = {"cmd": cmd, "exit": proc.returncode, "stdout": o, "stderr": e, "timed_out": False}
    killed = r1["exit"] == -signal.SIGKILL
    done = max(read_steps(steps1), default=0)
    if not out.exists():
        r2 = run(cmd, timeout=300, environ=env(ATTACK_STEPS=str(steps2)))  # nothing to resume: start again
        how = "trained again (killed before the run directory existed)"
    else:
        r2 = run(contsup("train", "--resume", str(out)), timeout=300, environ=env(ATTACK_STEPS=str(steps2)))
        how = "resumed"
    resumed = read_steps(steps2)
    # killed after the run had finished (model.pt written): resume says so, nothing to redo
    complete = r2["exit"] == 2 and "already finished" in r2["stderr"]
    start = resumed[0] - 1 if resumed else (done if r2["exit"] == 0 or complete else 0)
    survived = r2["exit"] == 0 or complete
    exact = survived and compare(out, ref)
    lost = steps_lost(done, start, EVERY) if killed else 0
    if killed:
        outcome = "survived" if survived else classify(r2["exit"], r2["stderr"], r2["timed_out"])
    else:  # the run ended before the kill point came: no kill to survive
        outcome = "missed" if r1["exit"] == 0 else classify(r1["exit"], r1["stderr"], r1["timed_out"])
    return case("kills", name, hook or name, r2, outcome,
                killed=killed, steps_done=done, resumed_from=start, lost_beyond_interval=lost, bit_exact=exact,
                how=how, leftovers=leftovers(out) if out.exists() else [], kill_stderr=first_line(r1["stderr"]))


# -- signals ---------------------------------------------------------------------------------------


def wait_steps(path: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        got = read_steps(path)
        if got and max(got) >= n:
            return max(got)
        time.sleep(0.02)
    return max(read_steps(path), default=0)


def signal_one(sig: signal.Signals, group: bool, workers: int, work: Path, refs: References) -> dict:
    sets = LONG + [f"data.workers={workers}"]
    ref = refs.get(sets)
    name = f"{sig.name} to the {'process group' if group else 'process'}, workers={workers}"
    d = work / re.sub(r"[^A-Za-z0-9]+", "-", name)
    d.mkdir(parents=True)
    out, steps = d / "run", d / "steps"
    cmd = train_cmd(out, sets)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env(ATTACK_STEPS=str(steps)), start_new_session=True)
    at = wait_steps(steps, 8, proc)
    (os.killpg if group else os.kill)(proc.pid, sig)
    try:
        o, e = proc.communicate(timeout=120)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        o, e = proc.communicate()
        hung = True
    done = max(read_steps(steps), default=0)
    ckpt = newest_checkpoint_step(out)
    stop_checkpoint = ckpt == done and done > 0
    r1 = {"cmd": cmd, "exit": proc.returncode, "stdout": o, "stderr": e, "timed_out": hung}
    r2 = run(contsup("train", "--resume", str(out)), timeout=300)
    exact = r2["exit"] == 0 and compare(out, ref)
    ok = (not hung and proc.returncode == STOP_EXITS[sig] and stop_checkpoint and "Traceback" not in e)
    return case("signals", name, f"{sig.name} after step {at}", r1, "clean" if ok else ("hang" if hung else ("traceback" if "Traceback" in e else "other")),
                steps_done=done, checkpoint_step=ckpt, stop_checkpoint=stop_checkpoint, expected_exit=STOP_EXITS[sig],
                resume_exit=r2["exit"], bit_exact=exact, survived=r2["exit"] == 0,
                lost_beyond_interval=0 if stop_checkpoint else max(0, done - ckpt - EVERY))


# -- concurrent launches -----------------------------------------------------------------------------


def metric_epochs(run_dir: Path) -> list[int]:
    try:
        return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError, KeyError):
        return []


def stopped_run(out: Path, at: int = 8) -> None:
    """A run of LONG stopped with SIGINT after step ``at`` (a checkpoint there)."""
    steps = out.parent / f"{out.name}-steps"
    proc = subprocess.Popen(train_cmd(out, LONG), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env(ATTACK_STEPS=str(steps)), start_new_session=True)
    wait_steps(steps, at, proc)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)


def together(cmds: list[list[str]], delays: list[float], steps: Path | None = None) -> list[dict]:
    procs = []
    for cmd, delay in zip(cmds, delays):
        if delay > 0 and steps is not None and procs:
            wait_steps(steps, int(delay), procs[0][0])
        e = env(ATTACK_STEPS=str(steps)) if steps is not None and not procs else env()
        procs.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                       env=e, start_new_session=True), cmd))
    results = []
    for proc, cmd in procs:
        try:
            o, e = proc.communicate(timeout=400)
            results.append({"cmd": cmd, "exit": proc.returncode, "stdout": o, "stderr": e, "timed_out": False})
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            o, e = proc.communicate()
            results.append({"cmd": cmd, "exit": None, "stdout": o, "stderr": e, "timed_out": True})
    return results


def concurrent_one(kind: str, work: Path, refs: References) -> dict:
    ref = refs.get(LONG)
    d = work / kind.replace(" ", "-")
    d.mkdir(parents=True)
    out = d / "run"
    resume = contsup("train", "--resume", str(out))
    if kind == "two resumes at once":
        stopped_run(out)
        rs = together([resume, resume], [0, 0])
    elif kind == "three resumes at once":
        stopped_run(out)
        rs = together([resume, resume, resume], [0, 0, 0])
    elif kind == "resume while it trains":
        rs = together([train_cmd(out, LONG), resume], [0, 6], steps=d / "steps")
    elif kind == "resume while a resume runs":
        stopped_run(out)
        rs = together([resume, resume], [0, 14], steps=d / "steps")
    elif kind == "two trains into one out_dir":
        rs = together([train_cmd(out, LONG), train_cmd(out, LONG)], [0, 0])
    elif kind == "train while it trains":
        rs = together([train_cmd(out, LONG), train_cmd(out, LONG)], [0, 6], steps=d / "steps")
    else:  # "train --new while it trains": both must finish, in different directories
        rs = together([train_cmd(out, LONG), train_cmd(out, LONG, "--new")], [0, 6], steps=d / "steps")
    winners = [r for r in rs if r["exit"] == 0]
    losers = [r for r in rs if r["exit"] != 0]
    epochs = metric_epochs(out)
    if kind.startswith("train --new"):
        ok = len(winners) == 2
    else:
        ok = (len(winners) >= 1 and all(classify(r["exit"], r["stderr"], r["timed_out"]) == "clean" for r in losers)
              and strictly_increasing(epochs))
    names_holder = all(re.search(r"in use by process \d+|already exists", r["stderr"]) for r in losers)
    exact = compare(out, ref)
    return case("concurrent", kind, kind, losers[0] if losers else rs[-1], "clean" if ok else "other",
                exits=[r["exit"] for r in rs], epochs=epochs, increasing=strictly_increasing(epochs),
                names_holder=names_holder, bit_exact=exact, survived=bool(winners),
                tracebacks=sum("Traceback" in r["stderr"] for r in rs))


# -- damaged files --------------------------------------------------------------------------------


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) * 2 // 3] ^= 0x40  # inside the tensor data of a .pt file, past any header
    path.write_bytes(bytes(data))


def damage(path: Path, how: str) -> None:
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])
    elif how == "flip":
        flip(path)
    elif how == "directory":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        path.mkdir()
        (path / "x").write_text("x")
    elif how == "delete":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif how == "file":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        path.write_text("not a folder\n")
    elif how == "flip+no-digest":
        flip(path)
        (path.parent / (path.name + ".sha256")).unlink()
    elif how == "garbage":
        path.write_text("zzzz not a digest\n")
    elif how == "bad-utf8":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] = 0xFF
        path.write_bytes(bytes(data))


def damage_targets(run_dir: Path) -> list[tuple[str, str]]:
    newest = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1].relative_to(run_dir)
    return [(t, h) for t, hs in [
        ("model.pt", ["truncate", "flip", "directory", "delete", "flip+no-digest"]),
        ("model.pt.sha256", ["delete", "garbage"]),
        (str(newest), ["truncate", "flip", "directory", "delete", "flip+no-digest"]),
        (str(newest) + ".sha256", ["garbage"]),
        ("checkpoints", ["delete", "file"]),
        ("metrics.jsonl", ["truncate", "bad-utf8", "directory", "delete"]),
        ("recipe.toml", ["truncate", "flip", "directory", "delete"]),
    ] for h in hs]


# The Python API raises ContsupError for bad input: a caller prints its one line; anything else
# escaping is a traceback.
API_ERROR = (
    "import sys, contsup\n"
    "def one_line(exc):\n"
    "    print(f'error: {exc}', file=sys.stderr)\n"
    "    sys.exit(2)\n"
)
LOAD_MODEL = API_ERROR + (
    "import hashlib, torch\n"
    "try:\n"
    "    net = contsup.load_model(sys.argv[1])\n"
    "except contsup.ContsupError as exc:\n"
    "    one_line(exc)\n"
    "h = hashlib.sha256()\n"
    "for k, v in sorted(net.state_dict().items()):\n"
    "    h.update(k.encode()); h.update(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes())\n"
    "print(h.hexdigest())\n"
)


def damage_commands(run_dir: Path) -> dict[str, list[str]]:
    return {
        "eval": contsup("eval", str(run_dir)),
        "results": contsup("results", str(run_dir)),
        "report": contsup("report", str(run_dir), "-o", str(run_dir.parent / "report")),
        "load_model": [sys.executable, "-c", LOAD_MODEL, str(run_dir)],
    }


def normalise(text: str, run_dir: Path) -> str:
    """Output comparable between copies of a run: its path, and which file eval read (model.pt
    or a checkpoint, which it names), left out."""
    text = text.replace(str(run_dir.parent), "RUN")
    return re.sub(r"^(RUN/run): [^;\n]*;", r"\1: SOURCE;", text, flags=re.M)


def damage_one(target: str, how: str, command: str, finished: Path, stopped: Path, intact: dict, work: Path,
               refs: References) -> dict:
    d = work / re.sub(r"[^A-Za-z0-9]+", "-", f"{target}-{how}-{command}")
    d.mkdir(parents=True)
    # resume works on the stopped run, except for model.pt, which only a finished run has
    source = stopped if command == "resume" and not target.startswith("model.pt") else finished
    run_dir = d / "run"
    shutil.copytree(source, run_dir, symlinks=True)
    if command == "resume" and target.startswith("checkpoints/"):
        # the stopped run's newest checkpoint, not the finished run's name
        newest = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1]
        target = str(newest.relative_to(run_dir)) + (".sha256" if target.endswith(".sha256") else "")
    damage(run_dir / target, how)
    inp = f"{target}: {how}"
    if command == "resume":
        r = run(contsup("train", "--resume", str(run_dir)), timeout=300)
        o = classify(r["exit"], r["stderr"], r["timed_out"], accepted="ok")
        exact = None
        if o == "ok":
            exact = compare(run_dir, refs.get(LONG))
            o = "repaired" if exact else ("warned" if any(x.startswith("warning:") for x in r["stderr"].splitlines()) else "silent")
            if exact is False and source is finished and not any(x.startswith("warning:") for x in r["stderr"].splitlines()):
                o = "silent"
        return case("damage", f"{inp} -> resume", inp, r, o, command="resume", bit_exact=exact,
                    on="stopped run" if source is stopped else "finished run")
    cmd = damage_commands(run_dir)[command]
    r = run(cmd, timeout=240)
    o = classify_damage(r["exit"], r["stderr"], normalise(r["stdout"], run_dir), intact[command], r["timed_out"])
    return case("damage", f"{inp} -> {command}", inp, r, o, command=command, stdout=r["stdout"][-300:])


# -- full disk and read-only -------------------------------------------------------------------------


def unshare_works() -> bool:
    try:
        r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt && echo ok"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.stdout.strip() == "ok"


def in_namespace(script: str, timeout: float = 600) -> dict:
    return run(["unshare", "-rm", "bash", "-c", script], timeout=timeout)


def disk_one(name: str, size: str, prefill: str, work: Path, refs: References) -> list[dict]:
    """Train LONG into a tmpfs of ``size``, resume while still full, then on a grown one."""
    ref = refs.get(LONG)
    d = work / re.sub(r"[^A-Za-z0-9]+", "-", name)
    d.mkdir(parents=True)
    mnt = d / "mnt"
    mnt.mkdir()
    q = lambda c: " ".join(f"'{a}'" for a in c)  # noqa: E731
    out = mnt / "run"
    train = q(train_cmd(out, LONG))
    resume = q(contsup("train", "--resume", str(out)))
    script = f"""
set -u
mount -t tmpfs -o size={size} tmpfs {mnt} || exit 97
{f"head -c {prefill} /dev/zero > {mnt}/filler 2>/dev/null" if prefill else ""}
cd {ROOT}
{train} >{d}/1.out 2>{d}/1.err; echo $? >{d}/1.rc
{resume} >{d}/2.out 2>{d}/2.err; echo $? >{d}/2.rc
rm -f {mnt}/filler; mount -o remount,size=64m {mnt}
if [ -d {out} ]; then {resume} >{d}/3.out 2>{d}/3.err; echo $? >{d}/3.rc
else {train} >{d}/3.out 2>{d}/3.err; echo $? >{d}/3.rc; fi
cp -a {out} {d}/copy 2>/dev/null
"""
    r = in_namespace(script)
    results = []
    for i, label in ((1, "train on the full disk"), (2, "resume while still full"), (3, "resume after space was freed")):
        if i > 1 and results and results[0]["outcome"] == "trained":
            break  # the disk was large enough: nothing to resume
        try:
            rc = int((d / f"{i}.rc").read_text())
            err = (d / f"{i}.err").read_text(errors="replace")
        except (OSError, ValueError):
            rc, err = None, r["stderr"]
        rr = {"cmd": ["contsup", "train"] + (["--resume"] if i > 1 else []), "exit": rc, "stderr": err}
        o = classify(rc, err, accepted="trained", clean_exits=(1, 2))
        extra = {}
        if i == 3:
            extra["bit_exact"] = rc == 0 and compare(d / "copy", ref)
            extra["survived"] = rc == 0
            extra["leftovers"] = leftovers(d / "copy") if (d / "copy").exists() else []
        results.append(case("disk", f"{name}: {label}", f"tmpfs {size}" + (f", {prefill} filled" if prefill else ""), rr, o, **extra))
    return results


def readonly_one(work: Path, finished: Path, stopped: Path) -> list[dict]:
    """Commands on read-only run directories (a read-only bind mount)."""
    d = work / "readonly"
    d.mkdir(parents=True)
    fin, stp, parent = d / "finished", d / "stopped", d / "parent"
    shutil.copytree(finished, fin, symlinks=True)
    shutil.copytree(stopped, stp, symlinks=True)
    parent.mkdir()
    q = lambda c: " ".join(f"'{a}'" for a in c)  # noqa: E731
    cmds = {
        "resume a read-only stopped run": contsup("train", "--resume", str(stp)),
        "resume a read-only finished run": contsup("train", "--resume", str(fin)),
        "eval a read-only run": contsup("eval", str(fin)),
        "results of a read-only run": contsup("results", str(fin)),
        "weights of a read-only run (default output inside it)": contsup("weights", str(fin)),
        "train into a read-only folder": train_cmd(parent / "run", LONG),
    }
    lines = [f"mount --bind {p} {p} && mount -o remount,ro,bind {p} || exit 97" for p in (fin, stp, parent)]
    for i, cmd in enumerate(cmds.values()):
        lines.append(f"cd {ROOT}; {q(cmd)} >{d}/{i}.out 2>{d}/{i}.err; echo $? >{d}/{i}.rc")
    r = in_namespace("\n".join(lines))
    results = []
    for i, (label, cmd) in enumerate(cmds.items()):
        try:
            rc, err = int((d / f"{i}.rc").read_text()), (d / f"{i}.err").read_text(errors="replace")
        except (OSError, ValueError):
            rc, err = None, r["stderr"]
        results.append(case("disk", label, "read-only bind mount", {"cmd": cmd, "exit": rc, "stderr": err},
                            classify(rc, err, accepted="ok", clean_exits=(1, 2))))
    return results


# -- malicious pickles --------------------------------------------------------------------------------


class Evil:
    """Unpickling it would create the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_bytes(marker: Path, kind: str) -> bytes:
    if kind == "raw pickle":
        return pickle.dumps({"model": Evil(str(marker))}, protocol=2)
    # torch's zip format, written without importing torch here: a subprocess does it
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, sys.argv[3])\n"
        "from attack import Evil\n"
        "torch.save({'model': Evil(sys.argv[1])}, sys.argv[2])\n"
    )
    tmp = marker.parent / "evil.pt"
    subprocess.run([sys.executable, "-c", code, str(marker), str(tmp), str(Path(__file__).resolve().parent)],
                   check=True, env=env(), capture_output=True)
    data = tmp.read_bytes()
    tmp.unlink()
    return data


def write_with_digest(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    (path.parent / (path.name + ".sha256")).write_text(f"{hashlib.sha256(data).hexdigest()}  {len(data)}\n")


EVALUATE = API_ERROR + (
    "try:\n"
    "    print(contsup.evaluate(sys.argv[1]))\n"
    "except contsup.ContsupError as exc:\n"
    "    one_line(exc)\n"
)


def pickle_one(kind: str, path_name: str, finished: Path, stopped: Path, work: Path) -> dict:
    d = work / re.sub(r"[^A-Za-z0-9]+", "-", f"{kind}-{path_name}")
    d.mkdir(parents=True)
    marker = d / "PWNED"
    data = evil_bytes(marker, kind)
    if path_name == "--resume":
        run_dir = d / "run"
        shutil.copytree(stopped, run_dir, symlinks=True)
        for p in sorted((run_dir / "checkpoints").glob("step-*.pt")):
            write_with_digest(p, data)
        cmd = contsup("train", "--resume", str(run_dir))
        placed = "every checkpoint (digests matching)"
    else:
        run_dir = d / "run"
        shutil.copytree(finished, run_dir, symlinks=True)
        write_with_digest(run_dir / "model.pt", data)
        placed = "model.pt (digest matching)"
        cmd = {
            "eval": contsup("eval", str(run_dir)),
            "weights": contsup("weights", str(run_dir), "-o", str(d / "w.png")),
            "probe": contsup("probe", str(run_dir), "-o", str(d / "p.png"), "--epochs", "1"),
            "bench --inference": contsup("bench", str(run_dir), "--inference", "--repeats", "1", "--out", str(d / "bench")),
            "load_model": [sys.executable, "-c", LOAD_MODEL, str(run_dir)],
            "evaluate": [sys.executable, "-c", EVALUATE, str(run_dir)],
        }[path_name]
    r = run(cmd, timeout=300)
    o = classify(r["exit"], r["stderr"], r["timed_out"], accepted="loaded")
    ran = marker.exists()
    return case("pickles", f"{kind} as {placed} -> {path_name}", f"{kind}: {placed}", r, "executed" if ran else o,
                marker_created=ran, literal_newline="\\n" in r["stderr"])


# -- the report --------------------------------------------------------------------------------------

# outcomes of a case that ended as it should (an error in one line, a survived kill, ...)
GOOD = ("clean", "trained", "valid", "unaffected", "warned", "repaired", "ok", "survived")
COLUMNS = ("tried", "clean", "traceback", "other", "survived", "bit-exact", "data lost")


def counts(cases: list[dict]) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for c in cases:
        row = table.setdefault(c["category"], dict.fromkeys(COLUMNS, 0))
        row["tried"] += 1
        o = c["outcome"]
        good = o in GOOD
        row["clean"] += good
        row["traceback"] += o == "traceback"
        row["other"] += not good and o != "traceback"
        row["survived"] += bool(c.get("survived")) or o == "survived"
        row["bit-exact"] += bool(c.get("bit_exact"))
        row["data lost"] += bool(c.get("lost_beyond_interval")) or o == "silent"
    return table


def markdown(cases: list[dict], seconds: float, quick: bool) -> str:
    table = counts(cases)
    lines = [f"# contsup attack ({'quick' if quick else 'full'}, {len(cases)} cases, {seconds:.0f} s)", "",
             "| category | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for cat, row in table.items():
        lines.append(f"| {cat} | " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
    outcomes: dict[str, dict[str, int]] = {}
    for c in cases:
        outcomes.setdefault(c["category"], {}).setdefault(c["outcome"], 0)
        outcomes[c["category"]][c["outcome"]] += 1
    lines += ["", "Outcomes: " + "; ".join(f"{cat}: " + ", ".join(f"{k} {v}" for k, v in sorted(o.items()))
                                           for cat, o in outcomes.items())]
    bad = [c for c in cases if c["outcome"] not in GOOD
           or c.get("literal_newline") or c.get("bit_exact") is False or c.get("lost_beyond_interval")
           or c.get("leftovers") or c.get("marker_created") or c.get("unsafe_advice")]
    lines += ["", f"## Not clean ({len(bad)})", ""]
    for c in bad:
        flags = [k for k in ("literal_newline", "marker_created", "unsafe_advice") if c.get(k)]
        if c.get("bit_exact") is False:
            flags.append("not bit-exact")
        if c.get("lost_beyond_interval"):
            flags.append(f"{c['lost_beyond_interval']} steps lost beyond the interval")
        if c.get("leftovers"):
            flags.append("leftovers " + ", ".join(c["leftovers"]))
        step = f" ({c['step']})" if c.get("step") else ""
        lines.append(f"- {c['category']}: {c['case']}{step}: {c['outcome']}, exit {c['exit']}"
                     + (f" [{'; '.join(flags)}]" if flags else "") + (f": `{c['stderr'][:200]}`" if c["stderr"] else ""))
    accepted = [c for c in cases if c["category"] == "malformed" and c["outcome"] in ("trained", "valid")]
    if accepted:
        lines += ["", f"## Malformed inputs accepted ({len(accepted)}: check each should be)", ""]
        lines += [f"- {c['case']} ({c['step']}): {c['outcome']}" for c in accepted]
    return "\n".join(lines) + "\n"


# -- main --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output folder (attack.json, attack.md, the runs)")
    p.add_argument("--quick", action="store_true", help="a seeded subset, about 3 minutes")
    p.add_argument("--only", default="", help="comma-separated categories: malformed,kills,signals,concurrent,damage,disk,pickles")
    p.add_argument("--train-all", action="store_true", help="also train every recipe validate rejects (default: a seeded quarter)")
    p.add_argument("--malformed", type=int, default=0, metavar="N",
                   help="a seeded sample of N malformed inputs (default: all; 12 with --quick)")
    p.add_argument("--malformed-start", type=int, default=0, metavar="I",
                   help="malformed inputs from the I-th on (to continue a stopped run in another OUT)")
    p.add_argument("--render", action="store_true",
                   help="only rewrite OUT/attack.md from OUT/attack.json (several files: OUT/*/attack.json merged)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    only = set(filter(None, args.only.split(","))) or {"malformed", "kills", "signals", "concurrent", "damage", "disk", "pickles"}
    out = args.out.resolve()
    if args.render:
        print(render(out))
        return 0
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(args.seed)
    refs = References(work / "refs")
    began = time.monotonic()
    cases: list[dict] = []
    pool = concurrent.futures.ThreadPoolExecutor(args.jobs)

    def gather(futures, label):
        for f in futures:
            got = f.result()
            cases.extend(got if isinstance(got, list) else [got])
            write(out, cases, time.monotonic() - began, args, partial=True)  # what is done so far survives a stop
        print(f"attack: {label} done ({time.monotonic() - began:.0f} s)", file=sys.stderr, flush=True)

    needs_runs = only & {"kills", "signals", "concurrent", "damage", "disk", "pickles"}
    finished = stopped = None
    if needs_runs:
        ref = refs.get(LONG)
        finished = ref["dir"]
        stopped = work / "stopped" / "run"
        stopped.parent.mkdir()
        stopped_run(stopped, at=30)  # inside epoch 2: epoch 1 in metrics.jsonl, checkpoints at 25 and 30
        print(f"attack: reference run {ref['seconds']:.1f} s", file=sys.stderr, flush=True)

    if "pickles" in only:
        paths = ["eval", "weights", "probe", "bench --inference", "--resume", "load_model", "evaluate"]
        jobs = [(k, pth) for k in ("torch zip", "raw pickle") for pth in paths]
        if args.quick:
            jobs = jobs[:2]
        gather([pool.submit(pickle_one, k, pth, finished, stopped, work / "pickles") for k, pth in jobs],
               "malicious pickles")
    if "concurrent" in only:
        kinds = ["two resumes at once", "three resumes at once", "resume while it trains", "resume while a resume runs",
                 "two trains into one out_dir", "train while it trains", "train --new while it trains"]
        if args.quick:
            kinds = ["resume while it trains"]
        gather([pool.submit(concurrent_one, k, work / "concurrent", refs) for k in kinds], "concurrent launches")
    if "signals" in only:
        combos = [(s, g, w) for w in (0, 2) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) for g in (False, True)]
        if args.quick:
            combos = [(signal.SIGTERM, True, 2), (signal.SIGHUP, False, 0)]
        if any(w for *_, w in combos):
            refs.get(LONG + ["data.workers=2"])
        gather([pool.submit(signal_one, s, g, w, work / "signals", refs) for s, g, w in combos], "signals")
    if "damage" in only:
        intact_dir = work / "intact" / "run"
        shutil.copytree(finished, intact_dir, symlinks=True)
        intact = {k: normalise(run(c, timeout=240)["stdout"], intact_dir) for k, c in damage_commands(intact_dir).items()}
        # results and report read metrics.jsonl and recipe.toml only
        jobs = [(t, h, c) for t, h in damage_targets(finished) for c in ("eval", "results", "report", "load_model", "resume")
                if c not in ("results", "report") or t in ("metrics.jsonl", "recipe.toml")]
        if args.quick:
            jobs = [j for j in jobs if (j[0], j[1], j[2]) in {("model.pt", "flip", "eval"), ("model.pt", "flip", "load_model"),
                                                               ("metrics.jsonl", "bad-utf8", "results")}]
        gather([pool.submit(damage_one, t, h, c, finished, stopped, intact, work / "damage", refs) for t, h, c in jobs],
               "damaged files")
    if "disk" in only:
        if unshare_works():
            sizes = [("tmpfs 1 MB", "1m", ""), ("tmpfs 3 MB", "3m", ""), ("tmpfs 5 MB", "5m", ""),
                     ("tmpfs 7 MB", "7m", ""), ("tmpfs 9 MB", "9m", ""), ("tmpfs 12 MB", "12m", ""),
                     ("starting on a full disk", "4m", "4194304")]
            if args.quick:
                sizes = sizes[1:2]
            futures = [pool.submit(disk_one, n, s, f, work / "disk", refs) for n, s, f in sizes]
            if not args.quick:
                futures.append(pool.submit(readonly_one, work / "disk", finished, stopped))
            gather(futures, "full disk and read-only")
        else:
            print("attack: unshare -rm cannot mount a tmpfs here; full-disk and read-only cases skipped", file=sys.stderr)
    if "kills" in only:
        pts = kill_points(refs.get(LONG)["seconds"], rng, args.quick)
        gather([pool.submit(kill_one, n, h, t, work / "kills", refs) for n, h, t in pts], "kills")
    if "malformed" in only:
        all_cases = malformed_cases()
        pool_of = range(args.malformed_start, len(all_cases))
        n = min(len(pool_of), args.malformed or (12 if args.quick else len(pool_of)))
        chosen = sorted(rng.sample(pool_of, n))
        train_sample = set(rng.sample(range(len(all_cases)), len(all_cases) // 4))
        gather([pool.submit(malformed_one, all_cases[i], work / "malformed", args.train_all or i in train_sample, i)
                for i in chosen], "malformed input")
    pool.shutdown()
    print(write(out, cases, time.monotonic() - began, args, partial=False))
    return 0


def api_contract(cases: list[dict]) -> list[dict]:
    """Results written before the API scripts printed a ContsupError as one line: such an error
    escaping ``load_model``/``evaluate`` is the API's contract, not a traceback."""
    for c in cases:
        api = c["case"].endswith(("-> load_model", "-> evaluate"))
        if api and c["outcome"] == "traceback" and c["stderr"].startswith("contsup.errors."):
            c["outcome"], c["stderr"] = "clean", "error: " + c["stderr"].split(": ", 1)[-1]
    return cases


def render(out: Path) -> str:
    files = [out / "attack.json"] if (out / "attack.json").exists() else sorted(out.glob("*/attack.json"))
    loaded = [json.loads(f.read_text()) for f in files]
    cases = api_contract([c for d in loaded for c in d["cases"]])
    md = markdown(cases, sum(d["seconds"] for d in loaded), all(d["quick"] for d in loaded))
    if any(d.get("partial") for d in loaded):
        md = md.replace("\n", " (partial: stopped before the end)\n", 1)
    (out / "attack.md").write_text(md)
    return md


def write(out: Path, cases: list[dict], seconds: float, args: argparse.Namespace, partial: bool) -> str:
    (out / "attack.json").write_text(json.dumps({"seconds": round(seconds, 1), "quick": args.quick, "seed": args.seed,
                                                 "only": args.only, "partial": partial, "cases": cases},
                                                indent=1, default=str))
    md = markdown(cases, seconds, args.quick)
    if partial:
        md = md.replace("\n", " (partial: still running)\n", 1)
    (out / "attack.md").write_text(md)
    return md


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate docs/flagship.md: every figure of the flagship recipe, measured, in one place.

    python benchmarks/flagship.py                        # every section (hours on a shared 2-core machine)
    python benchmarks/flagship.py --sections time        # one section; the others are re-read from
                                                         # benchmarks/flagship.json
    python benchmarks/flagship.py --sections ""          # only rewrite docs/flagship.md from the JSON

Sections:

- ``time``: the README's command, ``contsup train recipes/digits.toml``, alone, with torch's own
  thread count, timed from start to exit, with the load average before and after;
- ``twins``: recipes/digits.toml against its twins digits_dgl.toml and digits_e2e.toml, three
  seeds each (benchmarks/flagship_twins.sweep.toml);
- ``choice``: the flagship with one setting changed at a time (benchmarks/flagship_choice/), the
  evidence for its settings;
- ``defaults``: the library's defaults without a preset or a warm-up (benchmarks/defaults.sweep.toml
  over benchmarks/defaults/: recipes that name their components and nothing else), end-to-end,
  DGL and ContSup R1E.

A section's runs are the runs of its sweep files, trained as ``contsup sweep`` would train them
(same run directories under runs/flagship/, finished ones skipped, unfinished ones resumed), but
each in a subprocess of its own with one torch thread, ``--jobs`` at a time. Each run's summary
(test error per epoch, its largest epoch-mean local loss, wall time, load average before and
after) is kept in the JSON under its run directory, so a section run again adds only what is new.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

from contsup.tools.sweep import Run, load_sweep  # noqa: E402

RESULTS = ROOT / "benchmarks" / "flagship.json"
DOC = ROOT / "docs" / "flagship.md"
COMMAND = "python benchmarks/flagship.py"
SWEEPS = {
    "twins": ["benchmarks/flagship_twins.sweep.toml"],
    "choice": [f"benchmarks/flagship_choice/{name}.sweep.toml" for name in ("start", "warmup", "batch", "adapters")],
    "defaults": ["benchmarks/defaults.sweep.toml", "benchmarks/defaults_start.sweep.toml"],
}
LN10 = math.log(10)  # the cross-entropy of a uniform guess among 10 classes


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def machine() -> str:
    """CPU model and the cores this process may use."""
    cpu = "unknown CPU"
    try:
        names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores available"


def load() -> float:
    return round(os.getloadavg()[0], 2)


def summary(run_dir: Path) -> dict[str, Any]:
    """What a finished run's metrics.jsonl says: the test error of every epoch, the final and best,
    and the largest epoch-mean local loss of any module (a spike shows as one above ln 10)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [max(l for l in row["train_loss"] if l is not None) for row in rows]
    return {
        "errors": [row["test_error_pct"] for row in rows],
        "final": rows[-1]["test_error_pct"],
        "best": min(row["test_error_pct"] for row in rows),
        "max_loss": round(max(losses), 3),
        "max_loss_epoch": losses.index(max(losses)) + 1,
        "train_s": round(sum(row["epoch_time_s"] for row in rows), 1),
    }


def train(args: list[str], threads: int | None = 1) -> dict[str, Any]:
    """``contsup train ARGS`` in a subprocess with ``threads`` torch threads (None: torch's own
    choice): its wall time and the load average before and after."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    before, start = load(), time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "contsup", "train", *args], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"contsup train {shlex.join(args)}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return {"wall_s": round(time.perf_counter() - start, 1), "load_before": before, "load_after": load()}


def label_of(run: Run) -> str:
    """A run's configuration: its recipe (from the repository root) and axis values, the seed left out."""
    values = [f"{k}={v}" for k, v in run.settings if k != "run.seed"]
    return " ".join([run.recipe.resolve().relative_to(ROOT).as_posix(), *values])


def seed_of(run: Run) -> int:
    return int(dict(run.settings).get("run.seed", 0))


def sweep_section(paths: list[str], jobs: int, previous: dict[str, Any], keep) -> dict[str, Any]:
    """Train the unfinished runs of the sweep files ``paths`` ``jobs`` at a time, one torch thread
    each, and summarise every run; summaries in ``previous`` (by run directory) are kept."""
    os.chdir(ROOT)  # sweep files name their out_dir relative to the repository root
    runs = [run for path in paths for run in load_sweep(ROOT / path).runs()]
    records: dict[str, Any] = {k: v for k, v in previous.get("runs", {}).items()}
    out = {"sweeps": paths, "machine": machine(), "threads": 1, "jobs": jobs, "runs": records}

    def one(run: Run) -> tuple[Run, dict[str, Any]]:
        args = ["--resume", str(run.run_dir)] if run.started else [str(run.recipe), *(a for o in run.overrides() for a in ("--set", o))]
        return run, train(args)

    todo = [run for run in runs if not run.finished]
    say(f"  {len(runs)} runs, {len(runs) - len(todo)} already finished")
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for future in concurrent.futures.as_completed([pool.submit(one, run) for run in todo]):
            run, timing = future.result()
            records[str(run.run_dir)] = {"label": label_of(run), "seed": seed_of(run), **summary(run.run_dir), **timing}
            r = records[str(run.run_dir)]
            say(f"  {r['label']} seed {r['seed']}: final {r['final']:.2f} % (best {r['best']:.2f}), largest epoch "
                f"loss {r['max_loss']:.2f}, {r['wall_s']:.0f} s at load {r['load_before']}-{r['load_after']}")
            keep(out)
    for run in runs:  # finished before this call and not recorded yet: no timing
        if str(run.run_dir) not in records:
            records[str(run.run_dir)] = summary(run.run_dir)
        records[str(run.run_dir)].update(label=label_of(run), seed=seed_of(run))
    order = [str(run.run_dir) for run in runs]
    out["runs"] = {k: records[k] for k in order}
    return out


def time_section() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "digits"
        timing = train(["recipes/digits.toml", "--set", f"run.out_dir={json.dumps(str(out))}"], threads=None)
        run = {**summary(out), **timing}
    say(f"  recipes/digits.toml: {run['wall_s']:.0f} s at load {run['load_before']}-{run['load_after']}")
    return {"machine": machine(), "threads": "torch's own thread count (OMP_NUM_THREADS unset)", **run}


# -- the page -----------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def groups(section: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for record in section["runs"].values():
        out.setdefault(record["label"], []).append(record)
    return {label: sorted(rs, key=lambda r: r["seed"]) for label, rs in out.items()}


def runs_table(section: dict, names: dict[str, str] | None = None) -> list[str]:
    lines = [
        "| configuration | final test error % | per seed | best epoch's % | epoch 1's test error % | largest epoch-mean local loss | minutes per run |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, rs in groups(section).items():
        finals = [r["final"] for r in rs]
        shown = (names or {}).get(label, f"`{label}`")
        per_seed = ", ".join(f"{e:.2f}" for e in finals)
        seeds = ", ".join(str(r["seed"]) for r in rs)
        first = ", ".join(f"{r['errors'][0]:.1f}" for r in rs)
        best = mean_std([r["best"] for r in rs])
        spike = max(r["max_loss"] for r in rs)
        minutes = ", ".join(f"{r['wall_s'] / 60:.1f}" if "wall_s" in r else "-" for r in rs)
        lines.append(f"| {shown} | {mean_std(finals)} | {per_seed} (seeds {seeds}) | {best} | {first} | {spike:.2f} | {minutes} |")
    return lines


def shipped(results: dict) -> dict[str, Any]:
    """The twins section's runs of recipes/digits.toml as shipped."""
    runs = results.get("twins", {}).get("runs", {})
    return {k: r for k, r in runs.items() if r["label"] == "recipes/digits.toml"}


def loads(section: dict) -> str:
    values = [v for r in section["runs"].values() for v in (r.get("load_before"), r.get("load_after")) if v is not None]
    return f"{min(values):.1f} to {max(values):.1f}" if values else "not recorded"


def section_head(name: str, section: dict) -> str:
    sweeps = ", ".join(f"`{p}`" for p in section["sweeps"])
    untimed = " Runs without a time were trained before this script timed them (so their thread count and the " \
        "load are not recorded either); their figures are read from their run folders." if any(
        "wall_s" not in r for r in section["runs"].values()) else ""
    return (
        f"`{COMMAND} --sections {name}` trains {sweeps} (the runs `contsup sweep` would train, into the same "
        f"folders), one torch thread per run, {section['jobs']} runs at a time, on {section['machine']}; the "
        f"load average (1 minute) was {loads(section)} while they ran (other work shared the machine)." + untimed
    )


def readme_time(results: dict) -> str:
    """The README's time claim for its run command, from the twins' runs of recipes/digits.toml:
    the fastest and slowest run's wall time and the load average around them (tests/test_docs.py
    checks that the README says exactly this)."""
    runs = list(shipped(results).values())
    walls = [r["wall_s"] for r in runs if "wall_s" in r]
    lo, hi = math.floor(min(walls) / 60), math.ceil(max(walls) / 60)
    return (f"{lo} to {hi} minutes a run on a shared 2-core CPU at load average "
            f"{loads({'runs': dict(enumerate(runs))})}, one torch thread")


def render(results: dict) -> str:
    meta = results.get("meta", {})
    lines = [
        "# The flagship recipe, measured",
        "",
        f"<!-- Generated by `{COMMAND}` from benchmarks/flagship.json; do not edit by hand. -->",
        "",
        "Every figure the docs give for `recipes/digits.toml` (ContSup R1E, CIFAR ResNet-32 cut into 16 "
        "gradient-isolated modules, scikit-learn's digits at their own 8x8) is on this page, written by "
        f"`{COMMAND}` (torch {meta.get('torch', '?')}, last run {meta.get('date', '?')}). digits has 360 "
        "test images, so one image is 0.28 % of test error. A run starts \"at chance\" when its first "
        "epoch ends near 90 % test error (a guess among 10 classes), and a loss \"spikes\" when a module's "
        f"mean local loss over an epoch rises above {LN10:.2f} (ln 10, the cross-entropy of a guess).",
        "",
    ]
    if shipped(results):
        lines += [f"The README's time claim, from the runs of `recipes/digits.toml` below: {readme_time(results)}.", ""]
    t = results.get("time")
    if t:
        lines += [
            "## How long the README's command takes",
            "",
            f"`contsup train recipes/digits.toml`, alone, {t['threads']}, on {t['machine']}: "
            f"**{t['wall_s'] / 60:.1f} minutes** from start to exit ({t['train_s']:.0f} s of it in the "
            f"epochs), at a load average (1 minute) of {t['load_before']:.1f} before and {t['load_after']:.1f} "
            f"after. Its final test error: {t['final']:.2f} %.",
            "",
        ]
    if "twins" in results:
        lines += [
            "## The flagship against its twins",
            "",
            section_head("twins", results["twins"]) + " Each recipe as shipped, seeds 0, 1 and 2. The minutes "
            "are each run's wall time from start to exit, two runs sharing the machine's two cores with other work "
            "(for a run resumed from its checkpoint, the time after the resume).",
            "",
            *runs_table(results["twins"]),
            "",
            "Without this script, the same runs and their final test errors:",
            "",
            "```bash",
            "OMP_NUM_THREADS=1 contsup sweep benchmarks/flagship_twins.sweep.toml",
            "contsup results runs/flagship/twins",
            "```",
            "",
        ]
    if "choice" in results:
        lines += [
            "## How the flagship's settings were chosen",
            "",
            section_head("choice", results["choice"]) + " Each changes one setting of recipes/digits.toml; "
            "the first row is the recipe as shipped (the twins' runs above). The recipe's comments say what it "
            "took from them. Rows of one seed are one seed: a difference of a few test images there says little.",
            "",
            *runs_table({"runs": {**shipped(results), **results["choice"]["runs"]}}),
            "",
            "The input size was not re-measured: the digits are 8x8, upsampling adds no information, and at "
            "16x16 a training step costs four times the arithmetic (`contsup plan recipes/digits.toml --json`: "
            "9.2 MFLOPs per image summed over the modules and adapters at 8x8, 36.8 at `--set data.size=16`).",
            "",
        ]
    if "defaults" in results:
        lines += [
            "## The library's defaults, without a preset or a warm-up",
            "",
            section_head("defaults", results["defaults"]) + " The recipes under `benchmarks/defaults/` name "
            "the dataset, the backbone, K = 16, the context and the learning rate 0.05 and nothing else: "
            "no preset and no `[schedule]` (so no warm-up); adapters, initialisation and schedule are the "
            "library's defaults. docs/recipes.md, \"Defaults and why\", says which defaults these runs made change.",
            "",
            *runs_table(results["defaults"]),
            "",
        ]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="time,twins,choice,defaults", help="comma list of time, twins, choice, defaults ('': only render)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time, one torch thread each")
    parser.add_argument("--results", default=str(RESULTS), help="the JSON file of raw results (read, updated, written)")
    parser.add_argument("--out", default=str(DOC), help="the Markdown file to write")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"time", *SWEEPS}
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def keep(section: str, data: Any) -> None:
        import torch

        results[section] = data
        results["meta"] = {"date": datetime.date.today().isoformat(), "torch": torch.__version__.split("+")[0]}
        results_path.write_text(json.dumps(results, indent=1) + "\n")

    for section in sections:
        say(f"section {section}")
        if section == "time":
            keep(section, time_section())
        else:
            keep(section, sweep_section(SWEEPS[section], args.jobs, results.get(section, {}), lambda d, s=section: keep(s, d)))
    Path(args.out).write_text(render(results))
    say(f"wrote {args.out} and {results_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

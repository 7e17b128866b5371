"""Measuring distributed runs: where each rank's time goes, and ``distributed.json``.

Every rank keeps a :class:`Clock` of one epoch: seconds computing (its modules' forward,
backward and steps), loading data, waiting to receive from the previous stage, waiting for its
sends to be taken, and communicating (gradient sums). Utilisation is computing time over the
epoch's training wall time. Rank 0 gathers the clocks each epoch and writes them, with the
throughput, into ``<run dir>/distributed.json``.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

REPORT_FILE = "distributed.json"
ACTIVITIES = ("compute", "load", "receive", "send", "communicate")


class Clock:
    """Seconds per activity (see :data:`ACTIVITIES`) since the last :meth:`reset`."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.totals = {a: 0.0 for a in ACTIVITIES}
        self._nested: list[float] = []  # per open measurement: seconds of the measurements inside it

    @contextlib.contextmanager
    def measure(self, activity: str) -> Iterator[None]:
        """Add the time spent inside to ``activity``, less that of measurements nested inside it
        (a gradient sum inside a step counts as communicating, not computing); on CUDA, computing
        waits for the GPU to finish so that busy time is the GPU's, not the launch time."""
        start = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            if activity == "compute" and self.device is not None and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            spent = time.perf_counter() - start
            self.totals[activity] += spent - self._nested.pop()
            if self._nested:
                self._nested[-1] += spent

    def loading(self, batches: Iterable) -> Iterator:
        """``batches``, counting the time spent waiting for each as loading."""
        it = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self.totals["load"] += time.perf_counter() - start
            yield item

    def snapshot(self, rank: int, wall_s: float, modules: list[int]) -> dict[str, Any]:
        """This rank's line of an epoch: seconds per activity and utilisation (compute / wall)."""
        out: dict[str, Any] = {"rank": rank, "modules": modules}
        out.update({f"{a}_s": round(v, 6) for a, v in self.totals.items()})
        out["wall_s"] = round(wall_s, 6)
        out["utilisation"] = round(out["compute_s"] / out["wall_s"], 4) if out["wall_s"] > 0 else None  # of the figures shown
        return out


def epoch_entry(epoch: int, images: int, train_time_s: float, ranks: list[dict]) -> dict[str, Any]:
    """One epoch of ``distributed.json``: throughput and every rank's clock."""
    return {
        "epoch": epoch,
        "images": images,
        "train_time_s": round(train_time_s, 6),
        "images_per_s": images / train_time_s if train_time_s > 0 else None,
        "ranks": ranks,
    }


def overall(report: dict) -> dict[str, Any]:
    """Throughput and per-rank utilisation over every epoch of a report."""
    epochs = report.get("epochs") or []
    images = sum(e["images"] for e in epochs)
    time_s = sum(e["train_time_s"] for e in epochs)
    ranks: dict[int, list[float]] = {}
    for e in epochs:
        for r in e["ranks"]:
            acc = ranks.setdefault(r["rank"], [0.0, 0.0])
            acc[0] += r["compute_s"]
            acc[1] += r["wall_s"]
    return {
        "images": images,
        "train_time_s": time_s,
        "images_per_s": images / time_s if time_s > 0 else None,
        "utilisation": {str(k): (c / w if w > 0 else None) for k, (c, w) in sorted(ranks.items())},
    }


def write_report(run_dir: Path, report: dict) -> None:
    """Write ``distributed.json`` atomically, with the totals over all epochs."""
    from contsup.training.rundir import atomic_write

    data = dict(report)
    data["overall"] = overall(report)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(run_dir) / REPORT_FILE, lambda f: json.dump(data, f, indent=2), binary=False)


def read_report(run_dir: Path) -> dict | None:
    """A run's ``distributed.json``, or None for a one-process run."""
    path = Path(run_dir) / REPORT_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _span(modules: list[int]) -> str:
    return f"module {modules[0]}" if len(modules) == 1 else f"modules {modules[0]}-{modules[-1]}"


def summary(report: dict) -> str:
    """One line: mode, throughput and each rank's utilisation (with its modules in a pipeline)."""
    total = overall(report)
    parts = []
    for e in (report.get("epochs") or [])[-1:]:
        for r in e["ranks"]:
            mods = r.get("modules") or []
            where = f" ({_span(mods)})" if report["mode"] == "pipeline" and mods else ""
            util = total["utilisation"].get(str(r["rank"]))
            parts.append(f"rank {r['rank']}{where} {100 * util:.0f}%" if util is not None else f"rank {r['rank']} -")
    speed = total["images_per_s"]
    return (
        f"{report['mode']} parallel on {report['world_size']} processes: "
        f"{speed:.0f} img/s; busy: {', '.join(parts)}" if speed is not None else f"{report['mode']} parallel: no training"
    )


# -- one process against N: what `contsup bench` and benchmarks/distributed_throughput.py run ----------


def torchrun_command(recipe: Path, nproc: int, overrides: list[str], python: str | None = None) -> list[str]:
    """``torchrun --standalone --nproc_per_node=N -m contsup train RECIPE --set ...`` (through the
    current interpreter, so the same environment runs it)."""
    import sys

    cmd = [python or sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "contsup", "train", str(recipe)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def _throughput(run_dir: Path) -> float | None:
    """Training images per second over the run's epochs after the first (all of them if only one)."""
    from contsup.training.rundir import read_metrics

    metrics = read_metrics(run_dir)
    timed = metrics[1:] or metrics
    images = sum(m["images_per_s"] * m["epoch_time_s"] for m in timed if m["images_per_s"])
    seconds = sum(m["epoch_time_s"] for m in timed)
    return images / seconds if seconds > 0 else None


def compare(
    recipe: Path, nproc: int, mode: str, out_dir: Path, overrides: list[str] = (), threads: int | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Train ``recipe`` with one process, then with ``nproc`` processes in ``mode`` ("pipeline"
    or "data"), both under torchrun; their throughput, speed-up and the ranks' utilisation.
    Every process of both runs gets ``threads`` CPU threads (default CPUs / ``nproc``), so one
    process is one worker of the same size in both: the CPU counterpart of one GPU against N."""
    import os
    import subprocess

    out_dir = Path(out_dir)
    cpus = os.cpu_count() or 1
    rows = {}
    for name, n, m in (("one process", 1, "none"), (f"{nproc} processes ({mode})", nproc, mode)):
        run_dir = out_dir / ("one" if n == 1 else f"{mode}-{n}")
        sets = [*overrides, f"distributed.mode={m}", f"run.out_dir={run_dir}"]
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = str(threads or max(1, cpus // nproc))
        cmd = torchrun_command(recipe, n, sets)
        if log is not None:
            log.write(f"$ OMP_NUM_THREADS={env['OMP_NUM_THREADS']} {' '.join(cmd)}\n")
            log.flush()
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed with status {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        report = read_report(run_dir)
        rows[name] = {
            "processes": n,
            "mode": m,
            "threads_per_process": int(env["OMP_NUM_THREADS"]),
            "run_dir": str(run_dir),
            "wall_s": time.perf_counter() - start,
            "images_per_s": _throughput(run_dir),
            "utilisation": overall(report)["utilisation"] if report else None,
            "stages": [r["modules"] for r in report["epochs"][-1]["ranks"]] if report and mode == "pipeline" else None,
        }
    one, many = rows.values()
    speedup = many["images_per_s"] / one["images_per_s"] if one["images_per_s"] and many["images_per_s"] else None
    return {"recipe": str(recipe), "mode": mode, "processes": nproc, "cpus": cpus,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "runs": rows, "speedup": speedup}


def format_comparison(result: dict) -> str:
    """The comparison as a small table, one run per line."""
    lines = [f"{result['recipe']}: one process against {result['processes']} ({result['mode']}), "
             f"{result['device']}, {result['cpus']} CPUs"]
    lines.append(f"{'run':<28} {'img/s':>9}  busy per rank")
    for name, row in result["runs"].items():
        util = row["utilisation"]
        busy = ", ".join(f"rank {k} {100 * v:.0f}%" for k, v in util.items() if v is not None) if util else "-"
        if row["stages"]:
            busy += " | " + ", ".join(_span(s) for s in row["stages"])
        speed = f"{row['images_per_s']:.1f}" if row["images_per_s"] else "-"
        lines.append(f"{name:<28} {speed:>9}  {busy}")
    if result["speedup"] is not None:
        lines.append(f"speed-up: {result['speedup']:.2f}x with {result['processes']} processes")
    return "\n".join(lines)

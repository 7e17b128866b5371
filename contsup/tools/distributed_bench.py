"""One process against N: what ``contsup bench`` on a distributed recipe and
``benchmarks/distributed_throughput.py`` run.

Both runs go through ``torchrun --standalone`` in child processes; their run directories give
the throughput (``metrics.jsonl``) and each rank's utilisation (``distributed.json``, written by
:mod:`contsup.distributed.timing`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from contsup.distributed.timing import module_span, overall, read_report
from contsup.training.rundir import read_metrics


def torchrun_command(recipe: Path, nproc: int, overrides: list[str], python: str | None = None) -> list[str]:
    """``torchrun --standalone --nproc_per_node=N -m contsup train RECIPE --set ...`` (through the
    current interpreter, so the same environment runs it)."""
    cmd = [python or sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "contsup", "train", str(recipe)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def _throughput(run_dir: Path) -> float | None:
    """Training images per second over the run's epochs after the first (all of them if only one)."""
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
            busy += " | " + ", ".join(module_span(s) for s in row["stages"])
        speed = f"{row['images_per_s']:.1f}" if row["images_per_s"] else "-"
        lines.append(f"{name:<28} {speed:>9}  {busy}")
    if result["speedup"] is not None:
        lines.append(f"speed-up: {result['speedup']:.2f}x with {result['processes']} processes")
    return "\n".join(lines)


__all__ = ["torchrun_command", "compare", "format_comparison"]

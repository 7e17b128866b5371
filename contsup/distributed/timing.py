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

from contsup.training.rundir import atomic_write

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

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave out of the totals what is measured inside: a pipeline's evaluation between
        epochs waits on other ranks too, but is no part of the epoch's training wall time."""
        kept = dict(self.totals)
        try:
            yield
        finally:
            self.totals = kept

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


class Timings:
    """A distributed run's timings, told of every epoch on every rank (a trainer callback): each
    rank's clock goes to rank 0, which rewrites ``distributed.json`` in ``run_dir``. ``modules``
    (each rank's own, in a pipeline) and ``shape`` (the pipeline's stages and replicas) are what
    the report says of this rank and of the run besides the timings."""

    def __init__(self, world: Any, recipe: Any, run_dir: Path | None, clock: Clock) -> None:
        self.world, self.recipe, self.run_dir, self.clock = world, recipe, run_dir, clock
        self.epochs: list[dict] = []
        self.modules: list[int] = []
        self.shape: dict[str, int] = {}

    def on_epoch_start(self) -> None:
        self.clock.reset()

    def on_epoch_end(self, epoch: int, images: int, elapsed: float) -> None:
        """Every rank's clock to rank 0, which rewrites ``distributed.json`` (collective)."""
        clocks = self.world.gather_objects(self.clock.snapshot(self.world.rank, elapsed, list(self.modules)), "gathering timings")
        if self.world.is_main:
            self.epochs.append(epoch_entry(epoch, images, elapsed, clocks))
            write_report(self.run_dir, self.report())

    def on_run_end(self, run_dir: Path) -> None:
        if self.world.is_main:
            write_report(run_dir, self.report())

    def report(self) -> dict:
        """What ``distributed.json`` holds."""
        return {
            "mode": self.recipe.distributed.mode,
            "world_size": self.world.size,
            "backend": self.world.backend,
            "device": str(self.clock.device),
            "batch_size": self.recipe.data.batch_size,
            "epochs": self.epochs,
            **self.shape,
        }


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


def module_span(modules: list[int]) -> str:
    """``module 3`` or ``modules 1-3``: the modules one rank holds."""
    return f"module {modules[0]}" if len(modules) == 1 else f"modules {modules[0]}-{modules[-1]}"


def summary(report: dict) -> str:
    """One line: mode, throughput and each rank's utilisation (with its modules in a pipeline)."""
    total = overall(report)
    parts = []
    for e in (report.get("epochs") or [])[-1:]:
        for r in e["ranks"]:
            mods = r.get("modules") or []
            where = f" ({module_span(mods)})" if report["mode"] == "pipeline" and mods else ""
            util = total["utilisation"].get(str(r["rank"]))
            parts.append(f"rank {r['rank']}{where} {100 * util:.0f}%" if util is not None else f"rank {r['rank']} -")
    speed = total["images_per_s"]
    return (
        f"{report['mode']} parallel on {report['world_size']} processes: "
        f"{speed:.0f} img/s; busy: {', '.join(parts)}" if speed is not None else f"{report['mode']} parallel: no training"
    )

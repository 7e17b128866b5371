"""Module-parallel greedy training against torch's pipeline schedules and DDP, on the same processes.

    OMP_NUM_THREADS=1 python benchmarks/pipeline_schedules.py [RECIPE] [--nproc 2 4] [--repeats 3] [--json F]

trains RECIPE's network (default benchmarks/resnet32_k16.toml: ResNet-32 in K = 16 modules, batch
128, synthetic 3x32x32 images) on N processes (gloo, CPU, --threads CPU threads each), one
``torchrun --standalone`` per configuration and N:

- ``greedy``: contsup's pipeline (``distributed.mode = "pipeline"``) with the recipe's context
  (R1E by default); ``dgl``: the same with ``context.use = "none"`` (local heads only);
- ``gpipe`` and ``1f1b``: end to end (the plain backbone: every module's units, the last head)
  under ``torch.distributed.pipelining`` with ``ScheduleGPipe`` and ``Schedule1F1B``;
- ``ddp``: end to end under ``DistributedDataParallel``, each rank a 1/N slice of every batch.

All pipelines cut the K modules into the same N contiguous stages (``--stages``, default equal
counts) and every batch into the same ``--micro-batches``. For each it reports images/s after
warm-up, each rank's busy fraction (computing time over wall time), where the rest went
(receiving, sending, gradient sums), the FLOPs a batch costs and the FLOP/s while computing, and
each rank's peak of saved activations: the bytes of the tensors autograd keeps for backward
alive at the worst moment (``contsup.training.measure.LiveMemory``, parameters and buffers left
out), and the process's peak resident memory. Configurations run in rotating order,
``--repeats`` times; the table gives medians. The result goes to OUT/result.json (and --json).
See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = ROOT / "benchmarks" / "resnet32_k16.toml"
CONFIGS = ("greedy", "dgl", "gpipe", "1f1b", "ddp")
GREEDY = ("greedy", "dgl")
TIMES = ("compute_s", "load_s", "receive_s", "send_s", "communicate_s", "wall_s", "busy")
RANK_FIELDS = ("rank", "modules", *TIMES, "saved_peak_bytes", "rss_peak_bytes")


def equal_stages(modules: int, n: int) -> list[int]:
    """``modules`` cut into ``n`` contiguous counts as equal as possible (larger first)."""
    base, extra = divmod(modules, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


# -- what each rank measures ----------------------------------------------------------------------


class SavedActivations:
    """The saved-tensor bytes alive at the worst moment, over everything run inside the context.

    Counts with contsup's live meter (a storage counts from the moment autograd saves it until the
    graph lets go of it); every module's parameters and buffers are left out, registered as the
    module first runs (through a global forward pre-hook), so it works on networks built inside
    ``contsup.train`` too."""

    def __init__(self) -> None:
        from contsup.training.measure import LiveMemory

        self.meter = LiveMemory(())
        self._seen: set[int] = set()

    def _exclude(self, module: Any, args: Any) -> None:
        from contsup.model.saved import storage_key

        if id(module) in self._seen:
            return
        self._seen.add(id(module))
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            key = storage_key(t)
            if key is not None and key not in self.meter.exclude:
                self.meter.exclude.add(key)
                weakref.finalize(t, self.meter.exclude.discard, key)  # a freed address may come back as an activation

    def __enter__(self) -> "SavedActivations":
        import torch

        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._exclude)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.meter.pack, self.meter.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        self._handle.remove()

    @property
    def peak(self) -> int:
        return int(self.meter.peak)


def rss_peak_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


# -- the workers (one per rank, under torchrun) ---------------------------------------------------


def greedy_worker(args: argparse.Namespace, rank: int) -> None:
    """contsup's own pipeline: ``contsup.train`` with ``distributed.mode = "pipeline"``; the first
    epoch warms up, the second is timed (its distributed.json entry)."""
    import contsup

    batch = contsup.load_recipe(args.recipe, args.set).data.batch_size
    sets = [*args.set]
    if args.worker == "dgl":
        sets.append('context.use="none"')
    sets += [
        'distributed.mode="pipeline"', f"distributed.stages={json.dumps(args.stages)}",
        f"distributed.micro_batches={args.micro_batches}", 'distributed.backend="gloo"', "distributed.timeout_s=900",
        f"data.train_size={batch * args.steps}", f"data.test_size={batch}", "run.epochs=2", 'run.device="cpu"',
        f'run.out_dir="{Path(args.out) / "run"}"',
    ]
    with SavedActivations() as saved:
        contsup.train(args.recipe, sets)
    _write(Path(args.out) / f"rank{rank}.json", {"rank": rank, "saved_peak_bytes": saved.peak, "rss_peak_bytes": rss_peak_bytes()})


def _e2e_parts(args: argparse.Namespace) -> tuple[Any, list, Any, Any]:
    """The recipe's network without context (K modules of plain backbone units), its bodies, the
    last module's head (the classifier) and the recipe."""
    import contsup

    sets = [*args.set, 'context.use="none"']
    recipe = contsup.load_recipe(args.recipe, sets)
    network = contsup.build_network(recipe)
    return network, [m.body for m in network.blocks], network.blocks[-1].head, recipe


def _batches(recipe: Any, count: int) -> list[tuple[Any, Any]]:
    """``count`` random batches of the recipe's shape: x (B, C, H, W), y (B,)."""
    import torch

    info = recipe.dataset.create().info()
    g = torch.Generator().manual_seed(0)
    b = recipe.data.batch_size
    return [(torch.randn((b, *info.input_shape), generator=g), torch.randint(0, info.num_classes, (b,), generator=g))
            for _ in range(count)]


def pipelining_worker(args: argparse.Namespace, rank: int, world: int) -> None:
    """End to end under ``torch.distributed.pipelining``: this rank's stage of the plain network."""
    import torch
    from torch import nn
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    from torch.distributed.pipelining import schedules

    from contsup.distributed.timing import Clock

    network, bodies, head, recipe = _e2e_parts(args)
    first = sum(args.stages[:rank])
    last = first + args.stages[rank]
    parts = bodies[first:last] + ([head] if rank == world - 1 else [])
    module = nn.Sequential(*parts).train()
    del network
    optimizer = recipe.optimizer.create().build(module.parameters())
    clock = Clock()
    stage = PipelineStage(module, rank, world, torch.device("cpu"))
    for name in ("forward_one_chunk", "backward_one_chunk"):
        _time_method(stage, name, clock, "compute")

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with clock.measure("compute"):
            return nn.functional.cross_entropy(out, y)

    kind = ScheduleGPipe if args.worker == "gpipe" else Schedule1F1B
    schedule = kind(stage, n_microbatches=args.micro_batches, loss_fn=loss_fn)
    _time_communication(schedules, clock)

    batches = _batches(recipe, 2)

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        with clock.measure("compute"):
            optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            schedule.step(x)
        elif rank == world - 1:
            schedule.step(target=y)
        else:
            schedule.step()
        with clock.measure("compute"):
            optimizer.step()

    _run_steps(args, rank, world, step, clock, (first + 1, last))


def ddp_worker(args: argparse.Namespace, rank: int, world: int) -> None:
    """End to end under DistributedDataParallel: the whole plain network, a 1/N slice of each batch.
    Its gradient sums overlap its backward, so the computing time is estimated from a few more
    backward passes without them (``no_sync``), run after the timed steps."""
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from contsup.distributed.timing import Clock

    network, bodies, head, recipe = _e2e_parts(args)
    model = DistributedDataParallel(nn.Sequential(*bodies, head).train())
    del network
    optimizer = recipe.optimizer.create().build(model.parameters())
    clock = Clock()
    batches = [(x.tensor_split(world)[rank], y.tensor_split(world)[rank]) for x, y in _batches(recipe, 2)]
    backward_s: list[float] = []

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        with clock.measure("compute"):
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
        start = time.perf_counter()
        loss.backward()
        backward_s.append(time.perf_counter() - start)
        with clock.measure("compute"):
            optimizer.step()

    def local_backward() -> float:
        x, y = batches[0]
        with model.no_sync():
            loss = nn.functional.cross_entropy(model(x), y)
            start = time.perf_counter()
            loss.backward()
            spent = time.perf_counter() - start
        optimizer.zero_grad(set_to_none=True)
        return spent

    def finish(line: dict) -> None:
        timed = backward_s[-args.steps:]
        local = min(sum(timed), len(timed) * statistics.median(local_backward() for _ in range(min(3, args.steps))))
        line["compute_s"] += local
        line["communicate_s"] = sum(timed) - local
        line["busy"] = line["compute_s"] / line["wall_s"]

    _run_steps(args, rank, world, step, clock, (1, len(bodies)), finish)


def _time_method(obj: Any, name: str, clock: Any, activity: str) -> None:
    method = getattr(obj, name)

    def timed(*a: Any, **k: Any) -> Any:
        with clock.measure(activity):
            return method(*a, **k)

    setattr(obj, name, timed)


def _time_communication(schedules: Any, clock: Any) -> None:
    """Count the schedule's waits on its point-to-point operations: as receiving when a batch of
    them holds a receive (the 1F1B schedule fuses a send with a receive), else as sending."""
    batch_p2p, wait = schedules._batch_p2p, schedules._wait_batch_p2p

    class Works(list):
        activity = "send"

    def tagged(ops: Any, desc: str | None = None) -> Works:
        works = Works(batch_p2p(ops, desc=desc))
        works.activity = "receive" if desc and "recv" in desc else "send"
        return works

    def timed_wait(works: Any) -> None:
        with clock.measure(getattr(works, "activity", "send")):
            wait(works)

    schedules._batch_p2p = tagged
    schedules._wait_batch_p2p = timed_wait


def _run_steps(args: argparse.Namespace, rank: int, world: int, step: Callable[[int], None], clock: Any,
               modules: tuple[int, int], finish: Callable[[dict], None] | None = None) -> None:
    """``--warmup`` steps, then ``--steps`` timed ones (from a barrier), under the saved-tensor
    meter; this rank's line goes to ``rank<r>.json``."""
    import torch.distributed as dist

    with SavedActivations() as saved:
        for i in range(args.warmup):
            step(i)
        dist.barrier()
        clock.reset()
        start = time.perf_counter()
        for i in range(args.steps):
            step(args.warmup + i)
        wall = time.perf_counter() - start
    t = clock.totals
    line = {"rank": rank, "modules": list(modules), "compute_s": t["compute"], "load_s": t["load"], "receive_s": t["receive"],
            "send_s": t["send"], "communicate_s": t["communicate"], "wall_s": wall, "busy": t["compute"] / wall}
    if finish is not None:
        finish(line)
    line.update(saved_peak_bytes=saved.peak, rss_peak_bytes=rss_peak_bytes())
    dist.barrier()
    _write(Path(args.out) / f"rank{rank}.json", line)


def worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.worker in GREEDY:
        greedy_worker(args, rank)
        return 0
    dist.init_process_group("gloo")
    try:
        (ddp_worker if args.worker == "ddp" else pipelining_worker)(args, rank, world)
    finally:
        dist.destroy_process_group()
    return 0


# -- the driver -----------------------------------------------------------------------------------


def _launch(args: argparse.Namespace, config: str, n: int, stages: list[int], out: Path) -> dict:
    """One configuration on ``n`` processes; its throughput and every rank's line."""
    import contsup

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
           "--worker", config, "--recipe", str(args.recipe), "--stages", ",".join(map(str, stages)),
           "--micro-batches", str(args.micro_batches), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--out", str(out)]
    for item in args.set:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": ""}
    load = os.getloadavg()[0]
    begin = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    (out / "log.txt").write_text(done.stdout + done.stderr) if out.exists() else None
    if done.returncode != 0:
        raise RuntimeError(f"{config} on {n} processes failed (status {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]
    batch = contsup.load_recipe(args.recipe, args.set).data.batch_size
    if config in GREEDY:
        report = json.loads((out / "run" / "distributed.json").read_text())
        timed = report["epochs"][-1]
        for line, r in zip(ranks, timed["ranks"]):
            line.update(modules=[r["modules"][0], r["modules"][-1]], compute_s=r["compute_s"], receive_s=r["receive_s"],
                        send_s=r["send_s"], communicate_s=r["communicate_s"], wall_s=r["wall_s"], busy=r["utilisation"],
                        load_s=r["load_s"])
        images_per_s = timed["images_per_s"]
    else:
        images_per_s = args.steps * batch / max(r["wall_s"] for r in ranks)
    return {"config": config, "nproc": n, "stages": stages, "images_per_s": images_per_s, "load_average": load,
            "seconds": time.perf_counter() - begin, "ranks": ranks}


def flops_per_batch(args: argparse.Namespace, configs: Sequence[str]) -> dict[str, int]:
    """FLOPs of one training step on one batch (forward and backward; convolutions and matrix
    products, as ``torch.utils.flop_counter`` counts them) per configuration: the work a batch
    costs, whatever runs it. The end-to-end configurations share the plain network's figure."""
    from torch.utils.flop_counter import FlopCounterMode

    import contsup
    from contsup.training.strategies import EndToEndStrategy, GreedyStrategy, StepStats

    kinds = {"greedy": ([], GreedyStrategy), "dgl": (['context.use="none"'], GreedyStrategy),
             "e2e": (['context.use="none"', "partition.modules=1"], EndToEndStrategy)}
    out = {}
    for name in dict.fromkeys(c if c in GREEDY else "e2e" for c in configs):
        sets, kind = kinds[name]
        recipe = contsup.load_recipe(args.recipe, [*args.set, *sets, 'run.device="cpu"'])
        network = contsup.build_network(recipe).train()
        strategy = kind(network, recipe.optimizer.create(), recipe.schedule.create(), 1000, 1000)
        x, y = _batches(recipe, 1)[0]
        with FlopCounterMode(display=False) as counter:
            strategy.step(x, y, StepStats(network.num_modules), lambda module, loss: None)
        out[name] = int(counter.get_total_flops())
    for config in configs:
        out[config] = out[config if config in GREEDY else "e2e"]
    return out


def _median_row(runs: list[dict], steps: int, flops: int) -> dict:
    """One configuration on one N over its repeats: the median throughput and its range; every
    rank's times from the run of median throughput (so that they add up within one run), and its
    worst saved peak over the runs; the computing seconds of all ranks per batch and the FLOP
    rate while computing."""
    n = runs[0]["nproc"]
    speeds = [r["images_per_s"] for r in runs]
    middle = sorted(runs, key=lambda r: r["images_per_s"])[(len(runs) - 1) // 2]
    ranks = []
    for k in range(n):
        lines = [r["ranks"][k] for r in runs]
        ranks.append({
            "rank": k, "modules": lines[0]["modules"], **{f: middle["ranks"][k][f] for f in TIMES},
            "saved_peak_bytes": max(line["saved_peak_bytes"] for line in lines),
            "rss_peak_bytes": max(line["rss_peak_bytes"] for line in lines),
        })
    compute = sum(line["compute_s"] for line in middle["ranks"]) / steps
    return {"config": runs[0]["config"], "nproc": n, "stages": runs[0]["stages"], "repeats": len(runs),
            "images_per_s": statistics.median(speeds), "images_per_s_min": min(speeds), "images_per_s_max": max(speeds),
            "median_repeat": middle["repeat"], "gflop_per_batch": flops / 1e9, "compute_s_per_batch": compute,
            "gflops_computing": flops / 1e9 / compute, "ranks": ranks}


def summarize(result: dict) -> dict:
    """``result`` with its rows (one per configuration and N) and the target, from its runs."""
    runs = result["runs"]
    rows = [_median_row([r for r in runs if r["config"] == c and r["nproc"] == n], result["steps"], result["flops"][c])
            for n in result["nproc"] for c in result["configs"]]
    loads = [r["load_average"] for r in runs]
    return {**result, "load_average_min": min(loads), "load_average_max": max(loads), "rows": rows,
            "target": target(rows, runs)}


NAMES = {"greedy": "contsup pipeline ({context})", "dgl": "contsup pipeline (DGL)", "gpipe": "GPipe, end to end",
         "1f1b": "1F1B, end to end", "ddp": "DDP, end to end"}


def target(rows: list[dict], runs: list[dict] = (), n: int = 2) -> dict | None:
    """Greedy on ``n`` processes against 1F1B on the same: the ratio of their median throughputs,
    the ratio within each repeat (one run of each, close in time), and the larger saved peak of any rank."""
    by = {r["config"]: r for r in rows if r["nproc"] == n}
    if "greedy" not in by or "1f1b" not in by:
        return None
    g, f = by["greedy"], by["1f1b"]
    peak = lambda row: max(r["saved_peak_bytes"] for r in row["ranks"])  # noqa: E731
    ratio = g["images_per_s"] / f["images_per_s"]
    speed = {(r["config"], r["repeat"]): r["images_per_s"] for r in runs if r["nproc"] == n}
    paired = [speed[("greedy", k)] / speed[("1f1b", k)] for c, k in sorted(speed) if c == "greedy" and ("1f1b", k) in speed]
    return {"nproc": n, "throughput_ratio": ratio, "ratio_per_repeat": paired,
            "greedy_saved_peak_bytes": peak(g), "1f1b_saved_peak_bytes": peak(f), "met": ratio >= 1.2 and peak(g) < peak(f)}


HEADER = ("configuration", "N", "img/s", "range", "/ 1F1B", "GFLOP / batch", "compute s / batch", "GFLOP/s computing",
          "busy per rank", "saved peak per rank (MiB)")


def table_rows(result: dict) -> list[tuple[str, ...]]:
    """One tuple of cells (:data:`HEADER`) per configuration and N."""
    rows, out = result["rows"], []
    for row in rows:
        ref = next((r for r in rows if r["nproc"] == row["nproc"] and r["config"] == "1f1b"), None)
        out.append((
            NAMES[row["config"]].format(context=result["context"]), str(row["nproc"]), f"{row['images_per_s']:.1f}",
            f"{row['images_per_s_min']:.1f}-{row['images_per_s_max']:.1f}",
            f"{row['images_per_s'] / ref['images_per_s']:.2f}" if ref else "-", f"{row['gflop_per_batch']:.1f}",
            f"{row['compute_s_per_batch']:.2f}", f"{row['gflops_computing']:.1f}",
            ", ".join(f"{100 * r['busy']:.0f}%" for r in row["ranks"]),
            ", ".join(f"{r['saved_peak_bytes'] / 2**20:.1f}" for r in row["ranks"]),
        ))
    return out


PROFILE_HEADER = ("configuration", "N", "rank", "modules", "compute", "receive", "send", "gradient sums", "other", "wall")


def profile_rows(result: dict) -> list[tuple[str, ...]]:
    """Where each rank's time went, in seconds per batch (medians over the repeats): computing,
    waiting to receive, waiting for sends to be taken, summing gradients (DDP), the rest."""
    out = []
    for row in result["rows"]:
        for r in row["ranks"]:
            per = lambda f: r[f] / result["steps"]  # noqa: E731
            other = per("wall_s") - sum(per(f) for f in ("compute_s", "receive_s", "send_s", "communicate_s"))
            mods = "all" if row["config"] == "ddp" else f"{r['modules'][0]}-{r['modules'][-1]}"
            out.append((NAMES[row["config"]].format(context=result["context"]), str(row["nproc"]), str(r["rank"]), mods,
                        *(f"{per(f):.3f}" for f in ("compute_s", "receive_s", "send_s", "communicate_s")),
                        f"{other:.3f}", f"{per('wall_s'):.3f}"))
    return out


def describe(result: dict) -> str:
    """What was run, in one line."""
    return (f"{result['recipe']}: batch {result['batch']}, K = {result['modules']}, {result['micro_batches']} micro-batches, "
            f"{result['threads']} thread(s) per process, gloo on CPU; {result['steps']} timed steps after warm-up, "
            f"median of {result['repeats']}; load average {result['load_average_min']:.1f} to {result['load_average_max']:.1f}")


def target_line(result: dict) -> str | None:
    t = result.get("target")
    if not t:
        return None
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    paired = t.get("ratio_per_repeat") or []
    each = f" (per repeat: {', '.join(f'{v:.2f}' for v in paired)})" if len(paired) > 1 else ""
    return (f"target (greedy >= 1.2x 1F1B on {t['nproc']} processes, lower saved peak): {t['throughput_ratio']:.2f}x{each}, "
            f"peak {mib(t['greedy_saved_peak_bytes'])} against {mib(t['1f1b_saved_peak_bytes'])} MiB: "
            + ("met" if t["met"] else "not met"))


def _aligned(header: tuple[str, ...], rows: list[tuple[str, ...]], left: tuple[int, ...]) -> list[str]:
    cells = [header, *rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return ["  ".join(v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))).rstrip() for c in cells]


def format_table(result: dict) -> str:
    """The result as aligned text: a line of what ran, one line per row, the target, and where
    each rank's time went."""
    lines = [describe(result), *_aligned(HEADER, table_rows(result), (0, 8))]
    lines += [t for t in [target_line(result)] if t]
    lines += ["", "seconds per batch, per rank:", *_aligned(PROFILE_HEADER, profile_rows(result), (0,))]
    return "\n".join(lines)


def _markdown(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in rows])


def markdown_table(result: dict) -> str:
    """The rows as a Markdown table (docs/distributed.md, the GPU check's report)."""
    return _markdown(HEADER, table_rows(result))


def markdown_profile(result: dict) -> str:
    """Where each rank's time went, as a Markdown table of seconds per batch."""
    return _markdown(PROFILE_HEADER, profile_rows(result))


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs"


def _shown(path: str) -> str:
    """``path`` relative to the checkout when it lies inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def run(args: argparse.Namespace, log: Any = sys.stderr) -> dict:
    """Every configuration on every N, ``--repeats`` rounds in rotating order; the result dict."""
    import contsup
    import torch

    recipe = contsup.load_recipe(args.recipe, args.set)
    if recipe.dataset.use != "synthetic":
        raise SystemExit(f"pipeline_schedules: {args.recipe}: data.use must be \"synthetic\" (the greedy runs set its "
                         f"train_size to steps x batch), got {recipe.dataset.use!r}")
    k = recipe.partition.modules
    out = Path(args.out)
    runs = []
    order = list(args.configs)
    for rep in range(args.repeats):
        for n in args.nproc:
            stages = args.stages if args.stages and len(args.stages) == n else equal_stages(k, n)
            rotated = order[rep % len(order):] + order[: rep % len(order)]
            for config in rotated:
                where = out / f"{config}-n{n}-r{rep}"
                where.mkdir(parents=True, exist_ok=True)
                got = _launch(args, config, n, stages, where)
                got["repeat"] = rep
                runs.append(got)
                log.write(f"[{rep}] {config} N={n}: {got['images_per_s']:.1f} img/s, busy "
                          + ", ".join(f"{100 * r['busy']:.0f}%" for r in got["ranks"])
                          + f" (load {got['load_average']:.1f}, {got['seconds']:.0f} s)\n")
                log.flush()
    return summarize({
        "command": " ".join(["python", "benchmarks/pipeline_schedules.py", *args.argv]),
        "recipe": _shown(args.recipe), "machine": machine(), "torch": torch.__version__, "backend": "gloo", "device": "cpu",
        "batch": recipe.data.batch_size, "modules": k, "context": recipe.context.use, "micro_batches": args.micro_batches,
        "threads": args.threads, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "configs": list(args.configs), "nproc": list(args.nproc), "flops": flops_per_batch(args, args.configs), "runs": runs,
    })


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", nargs="?", default=str(DEFAULT_RECIPE))
    p.add_argument("--recipe", dest="recipe_opt", help=argparse.SUPPRESS)
    p.add_argument("--nproc", type=int, nargs="+", default=[2, 4], help="process counts (default 2 4)")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--stages", type=lambda s: [int(v) for v in s.split(",")],
                   help="modules per stage, e.g. 8,8 (used for the N it fits; default equal counts)")
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per batch, every pipeline (default 4)")
    p.add_argument("--steps", type=int, default=8, help="timed steps (greedy: the second epoch's batches; default 8)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps of the torch configurations (greedy: one epoch)")
    p.add_argument("--repeats", type=int, default=1, help="rounds over the configurations, in rotating order")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of every process (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for every configuration")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "pipeline_schedules"), help="folder for the runs")
    p.add_argument("--json", help="write the result here too")
    p.add_argument("--summarize", metavar="JSON", help="print (and with --json rewrite) the table of an earlier result")
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.recipe_opt:
        args.recipe = args.recipe_opt
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        return worker(args)
    if args.summarize:
        result = summarize(json.loads(Path(args.summarize).read_text()))
        if args.json:
            _write(Path(args.json), result)
        print(format_table(result))
        return 0
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"pipeline_schedules: {out} is not empty; remove it or pass --out", file=sys.stderr)
        return 2
    result = run(args)
    _write(out / "result.json", result)
    if args.json:
        _write(Path(args.json), result)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The GPU check in one command (``benchmarks/gpu_check.sh``): on one CUDA GPU, in a few minutes,

1. the CUDA-only tests (those skipped without a CUDA device),
2. ``torch.cuda.max_memory_allocated`` and the median step of end-to-end, end-to-end under
   activation checkpointing (S = K), DGL and ContSup R1E (the official adapters, the default) at
   K = 4 and 16 on ResNet-32 batch 1024 and ResNet-110 batch 128, bf16 autocast, channels-last,
3. one short greedy training on CIFAR-shaped synthetic data: images/s, and how much of the time
   goes to data loading and how much to compute,
4. module-parallel against pipeline-parallel (``benchmarks/pipeline_schedules.py``: contsup's
   pipeline, torch's GPipe and 1F1B schedules, DDP) on 2 and 4 processes of this machine's CPU,
   gloo, one thread each: the rows of docs/distributed.md on a machine whose cores the 4
   processes do not oversubscribe (on the CPU because NCCL takes one GPU per process),

written as one JSON and one Markdown report (default ``gpu_check.json`` and ``gpu_check.md`` in
the current folder; ``--out PATH`` writes PATH.json and PATH.md). Without CUDA it says so in
one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing checked"
NETWORKS = (("cifar_resnet32", "ResNet-32", 1024), ("cifar_resnet110", "ResNet-110", 128))
KS = (4, 16)
CONFIGS = ("end-to-end", "checkpointing S=K", "DGL", "ContSup R1E")


def cuda_tests() -> list[str]:
    """Node ids of the tests skipped without CUDA: a ``skipif(not torch.cuda.is_available()...)``
    right above a ``def test_``."""
    ids = []
    pattern = re.compile(r"@pytest\.mark\.skipif\(not torch\.cuda\.is_available\(\)[^\n]*\n(?:@[^\n]*\n)*def (test_\w+)")
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        ids += [f"tests/{path.name}::{name}" for name in pattern.findall(path.read_text())]
    return ids


def run_tests(ids: list[str]) -> dict:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ids], cwd=ROOT, capture_output=True, text=True
    )
    tail = (done.stdout + done.stderr).strip().splitlines()
    return {"tests": ids, "returncode": done.returncode, "summary": tail[-1] if tail else "", "seconds": time.perf_counter() - start}


def recipe(backbone: str, k: int, context: str, batch: int, train_size: int | None = None, device: str = "cuda") -> Any:
    from contsup.config.recipe import loads_recipe
    from contsup.core.plugins import get_plugin_manager
    from contsup.core.registry import Registries

    text = f"""
[run]
seed = 0
device = "{device}"
precision = "bf16"
channels_last = true
[data]
use = "synthetic"
shape = [3, 32, 32]
train_size = {train_size or batch}
batch_size = {batch}
[backbone]
use = "{backbone}"
[partition]
use = "uniform"
modules = {k}
[context]
use = "{context}"
[optimizer]
lr = 0.05
"""
    registries = Registries.from_plugin_manager(get_plugin_manager(entry_points=False))
    return loads_recipe(text, registries, source=f"{backbone}-k{k}-{context}.toml")


def measure(config: str, backbone: str, k: int, batch: int, steps: int, warmup: int, device_name: str = "cuda") -> dict:
    """Peak allocation and median step of one configuration, alone on the GPU."""
    import torch

    from contsup.model.network import build_network
    from contsup.training.precision import Precision
    from contsup.training.strategies import CheckpointStrategy, EndToEndStrategy, GreedyStrategy, StepStats

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    plain = config in ("end-to-end", "checkpointing S=K")
    r = recipe(backbone, 1 if plain else k, "none" if config == "DGL" else "R1E", batch, device=device_name)
    torch.manual_seed(0)
    net = build_network(r).network.to(device).train().to(memory_format=torch.channels_last)
    precision = Precision("bf16", device)
    args = (net, r.optimizer.create(), r.schedule.create(), 1000, 1000)
    if config == "end-to-end":
        strategy: Any = EndToEndStrategy(*args, precision=precision)
    elif config == "checkpointing S=K":
        strategy = CheckpointStrategy(*args, segments=k, precision=precision)
    else:
        strategy = GreedyStrategy(*args, precision=precision)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    noop = lambda module, loss: None  # noqa: E731
    for _ in range(warmup):
        strategy.step(x, y, StepStats(net.num_modules), noop)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    ms = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        strategy.step(x, y, StepStats(net.num_modules), noop)
        sync()
        ms.append(1000.0 * (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    out = {"config": config, "backbone": backbone, "k": k, "batch": batch, "max_memory_allocated_bytes": int(peak),
           "step_peak_over_resident_bytes": int(peak - before), "step_ms_median": statistics.median(ms), "step_ms": ms}
    del strategy, net, x, y
    if cuda:
        torch.cuda.empty_cache()
    return out


def short_training(batches: int, batch: int, workers: int, device_name: str = "cuda") -> dict:
    """Greedy R1E K=4 on ResNet-32 over synthetic CIFAR-shaped data through the recipe's own
    loader: images/s, time waiting for batches (data loading) and time in steps (compute)."""
    import attrs
    import torch

    from contsup.model.network import build_network
    from contsup.training.loaders import make_loaders
    from contsup.training.precision import Precision
    from contsup.training.strategies import GreedyStrategy, StepStats

    device = torch.device(device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    r = recipe("cifar_resnet32", 4, "R1E", batch, train_size=batch * batches, device=device_name)
    r = attrs.evolve(r, data=attrs.evolve(r.data, workers=workers))
    loader, _, _ = make_loaders(r, r.dataset.create(), device)
    torch.manual_seed(0)
    net = build_network(r).network.to(device).train().to(memory_format=torch.channels_last)
    strategy = GreedyStrategy(net, r.optimizer.create(), r.schedule.create(), 1000, 1000, precision=Precision("bf16", device))
    noop = lambda module, loss: None  # noqa: E731
    data_s = compute_s = 0.0
    images = 0
    for epoch in range(2):  # the first epoch warms up (cuDNN autotuning, workers starting)
        data_s = compute_s = 0.0
        images = 0
        sync()
        mark = time.perf_counter()
        for x, y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            sync()
            got = time.perf_counter()
            data_s += got - mark
            strategy.step(x, y, StepStats(net.num_modules), noop)
            sync()
            mark = time.perf_counter()
            compute_s += mark - got
            images += len(y)
    total = data_s + compute_s
    return {"backbone": "cifar_resnet32", "k": 4, "context": "R1E", "batch": batch, "batches": batches, "workers": workers,
            "images": images, "images_per_s": images / total, "data_s": data_s, "compute_s": compute_s,
            "data_share": data_s / total, "bound_by": "data loading" if data_s > compute_s else "compute"}


DISTRIBUTED_STEPS = 4


def _script(name: str) -> Any:
    """Another script of benchmarks/ as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def distributed_rows(steps: int = DISTRIBUTED_STEPS, nproc: tuple[int, ...] = (2, 4), argv: list[str] = ()) -> dict:
    """benchmarks/pipeline_schedules.py on this machine's CPU (its default recipe: ResNet-32, batch
    128, K = 16): every configuration on each of ``nproc`` processes, one thread each, once."""
    import tempfile

    bench = _script("pipeline_schedules")
    with tempfile.TemporaryDirectory() as out:
        args = bench.parse([*argv, "--nproc", *map(str, nproc), "--steps", str(steps), "--warmup", "1", "--out", out])
        result = bench.run(args)
    result["table"] = bench.markdown_table(result)
    result["target_line"] = bench.target_line(result)
    return result


def markdown(report: dict) -> str:
    mib = lambda n: f"{n / 2**20:.0f}"  # noqa: E731
    over = lambda a, b: f"{a / b:.3f}" if b else "-"  # noqa: E731
    t = report["tests"]
    lines = [
        "## GPU check", "",
        f"Command: `benchmarks/gpu_check.sh`. Machine: {report['machine']}; torch {report['torch']}; "
        f"{report['seconds']:.0f} s in all.", "",
        f"CUDA-only tests ({len(t['tests'])}): {t['summary']} (exit {t['returncode']}).", "",
        f"bf16 autocast, channels-last, median of {report['steps']} steps after {report['warmup']} warm-up, "
        "each configuration alone. Peak: `torch.cuda.max_memory_allocated` during the steps (weights, "
        "optimizer state and the batch included).", "",
        "| network | batch | K | configuration | peak (MiB) | peak / end-to-end | step (ms) | step / end-to-end |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = report["memory_time"]
    for r in rows:
        e = next(o for o in rows if o["backbone"] == r["backbone"] and o["k"] == r["k"] and o["config"] == "end-to-end")
        lines.append(
            f"| {r['backbone']} | {r['batch']} | {r['k']} | {r['config']} | {mib(r['max_memory_allocated_bytes'])} | "
            f"{over(r['max_memory_allocated_bytes'], e['max_memory_allocated_bytes'])} | {r['step_ms_median']:.1f} | "
            f"{over(r['step_ms_median'], e['step_ms_median'])} |"
        )
    s = report["training"]
    lines += [
        "",
        f"Short training ({s['context']} K={s['k']}, {s['backbone']}, batch {s['batch']}, {s['batches']} batches, "
        f"{s['workers']} loader workers, second epoch): {s['images_per_s']:.0f} images/s; data loading "
        f"{s['data_s']:.2f} s, compute {s['compute_s']:.2f} s ({100 * s['data_share']:.0f} % waiting for data): "
        f"bound by {s['bound_by']}.",
    ]
    d = report.get("distributed")
    if d:
        lines += [
            "",
            f"Module-parallel against pipeline-parallel on this machine's CPU ({d['machine']}; gloo, "
            f"{d['threads']} thread per process, `benchmarks/pipeline_schedules.py --nproc 2 4 --steps {d['steps']} "
            f"--warmup 1`): ResNet-32 batch {d['batch']}, K = {d['modules']} in equal stages, {d['micro_batches']} "
            f"micro-batches; load average {d['load_average_min']:.1f} to {d['load_average_max']:.1f}.", "",
            d["table"],
        ]
        if d.get("target_line"):
            lines += ["", d["target_line"] + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check", help="writes OUT.json and OUT.md (default gpu_check)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-tests", action="store_true", help="skip the CUDA-only tests")
    parser.add_argument("--no-distributed", action="store_true", help="skip the module-parallel against pipeline-parallel rows")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]
    from contsup.tools.bench import machine

    torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    say = lambda text: print(f"[{time.perf_counter() - start:5.0f}s] {text}", file=sys.stderr, flush=True)  # noqa: E731
    tests = {"tests": [], "returncode": 0, "summary": "skipped (--no-tests)", "seconds": 0.0}
    if not args.no_tests:
        say("CUDA-only tests")
        tests = run_tests(cuda_tests())
        say(tests["summary"])
    rows = []
    for backbone, _, batch in NETWORKS:
        for k in KS:
            for config in CONFIGS:
                rows.append(measure(config, backbone, k, batch, args.steps, args.warmup))
                say(f"{backbone} batch {batch} K={k} {config}: {rows[-1]['max_memory_allocated_bytes'] / 2**20:.0f} MiB, "
                    f"{rows[-1]['step_ms_median']:.1f} ms")
    say("short training")
    training = short_training(batches=40, batch=256, workers=4)
    distributed = None
    if not args.no_distributed:
        say("module-parallel against pipeline-parallel, on the CPU")
        distributed = distributed_rows()
        say(distributed["target_line"] or "")
    report = {"machine": machine(), "torch": torch.__version__, "steps": args.steps, "warmup": args.warmup,
              "tests": tests, "memory_time": rows, "training": training, "distributed": distributed,
              "seconds": time.perf_counter() - start}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(report, indent=2))
    Path(f"{out}.md").write_text(markdown(report))
    print(f"gpu_check: wrote {out}.json and {out}.md in {report['seconds']:.0f} s; CUDA-only tests: {tests['summary']}")
    return 1 if tests["returncode"] not in (0, 5) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate docs/performance.md: activation memory, step time and the input encoders' accuracy.

    python benchmarks/performance.py                      # everything (about half an hour on 2 cores)
    python benchmarks/performance.py --sections memory    # one section; the others are re-read
                                                          # from benchmarks/results.json

Memory figures are saved-tensor bytes: exact and deterministic on any machine. Step times are
medians of a few alternating steps and depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

import torch  # noqa: E402
from torch import nn  # noqa: E402

from contsup.tools.bench import machine, run_bench
from contsup.tools.bench_output import MARKDOWN_HEADER, configuration_rows, configurations  # noqa: E402
from contsup.training.device import seed_everything  # noqa: E402
from contsup.training.loop import Trainer
from contsup.training.strategies import EndToEndStrategy, GreedyStrategy, StepStats
from contsup.model.build import recipe_parts
from contsup.model.costs import CostModel
from contsup.model.fitting import fitted_costs  # noqa: E402
from contsup.training.measure import measure_step  # noqa: E402
from contsup.model.network import build_network  # noqa: E402
from contsup.core.plugins import get_plugin_manager  # noqa: E402
from contsup.config.recipe import load_recipe, loads_recipe  # noqa: E402
from contsup.core.registry import Registries  # noqa: E402
from contsup.training.rundir import atomic_write  # noqa: E402
from contsup.types import Costs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results.json"
DOC = ROOT / "docs" / "performance.md"
COMMAND = "python benchmarks/performance.py"
KS = (1, 2, 4, 8, 16)
CONTEXTS = (("none", "none", "paper"), ("E", "E", "paper"), ("R1E", "R1E", "paper"), ("R1E, fast encoder", "R1E", "fast"))
PARTITIONERS = ("uniform", "memory_balanced")
BACKBONES = (("cifar_resnet32", "ResNet-32"), ("cifar_resnet110", "ResNet-110"))
MIB = 2**20

_registries: Registries | None = None


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def registries() -> Registries:
    global _registries
    if _registries is None:
        _registries = Registries.from_plugin_manager(get_plugin_manager(entry_points=False))
    return _registries


def cifar_like(backbone: str, k: int, context: str, partitioner: str = "uniform", encoder: str = "paper", batch: int = 128) -> Any:
    """A recipe on synthetic 3x32x32 images (CIFAR's shape) at ``batch``."""
    text = f"""
[run]
seed = 0
[data]
use = "synthetic"
shape = [3, 32, 32]
train_size = {batch}
batch_size = {batch}
[backbone]
use = "{backbone}"
[partition]
use = "{partitioner}"
modules = {k}
[context]
use = "{context}"
{'encoder = "' + encoder + '"' if context != "none" else ""}
[optimizer]
lr = 0.05
"""
    return loads_recipe(text, registries(), source=f"{backbone}-k{k}-{context}-{partitioner}.toml")


# -- memory -----------------------------------------------------------------------------------


def memory_section(batch: int = 128) -> dict:
    """Per backbone, K, context and partitioner: split, predicted and measured greedy peak; the
    end-to-end figure of the plain backbone."""
    out: dict[str, Any] = {}
    for backbone, label in BACKBONES:
        base = cifar_like(backbone, 1, "none", batch=batch)
        seed_everything(0)
        plain = build_network(base)
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(2))
        e2e = EndToEndStrategy(plain.network, base.optimizer.create(), base.schedule.create(), 10, 10)
        e2e_bytes = max(measure_step(e2e, x, y))
        say(f"{label}: end-to-end saves {e2e_bytes / MIB:.1f} MiB")
        rows = []
        for context_label, context, encoder in CONTEXTS:
            recipe = cifar_like(backbone, 1, context, encoder=encoder, batch=batch)
            parts, shapes, info = recipe_parts(recipe)
            model = CostModel(recipe, parts, shapes, info)
            measured_cache: dict[tuple, int] = {}
            for k in KS:
                for partitioner in PARTITIONERS:
                    r = cifar_like(backbone, k, context, partitioner, encoder=encoder, batch=batch)
                    split = r.partitioner.create().split
                    costs = fitted_costs(model, split, k) if partitioner == "memory_balanced" else Costs.uniform(model.n)
                    sizes = tuple(split(costs, k))
                    predicted = max(c.bytes for c in model.plan_costs(sizes))
                    if sizes not in measured_cache:
                        start = time.perf_counter()
                        seed_everything(0)
                        net = build_network(r, costs=costs).network
                        greedy = GreedyStrategy(net, r.optimizer.create(), r.schedule.create(), 10, 10)
                        measured_cache[sizes] = max(measure_step(greedy, x, y))
                        say(f"  {label} K={k} {context_label} {partitioner}: {measured_cache[sizes] / MIB:.1f} MiB "
                            f"[{time.perf_counter() - start:.1f}s]")
                    measured = measured_cache[sizes]
                    rows.append(
                        {
                            "k": k, "context": context_label, "partitioner": partitioner, "sizes": list(sizes),
                            "predicted": predicted, "measured": measured,
                        }
                    )
        out[backbone] = {"label": label, "e2e": e2e_bytes, "rows": rows}
    return {"batch": batch, "backbones": out}


# -- step time --------------------------------------------------------------------------------


TIME_VARIANTS = (  # name, context, encoder, contiguous layout for the paper encoder
    ("end-to-end", "none", "paper", False),
    ("DGL (no context)", "none", "paper", False),
    ("E, paper encoder", "E", "paper", False),
    ("E, fast encoder", "E", "fast", False),
    ("R1E, paper encoder", "R1E", "paper", False),
    ("R1E, paper encoder, contiguous layout", "R1E", "paper", True),
    ("R1E, pooled encoder", "R1E", "pooled", False),
    ("R1E, fast encoder", "R1E", "fast", False),
)
# run again with the whole network and its input in channels-last format (run.channels_last = true)
CHANNELS_LAST_RUNS = ("end-to-end", "DGL (no context)", "R1E, fast encoder")
WHOLE = ", run.channels_last"


def encoder_layouts(batch: int = 128, rounds: int = 12) -> list[dict]:
    """The paper's encoder alone (forward and backward), contiguous against channels-last, for
    ResNet-32's three target shapes; the two alternate, the first two rounds are not counted."""
    from contsup_context.adapters import InputEncoder

    out = []
    gen = torch.Generator().manual_seed(0)
    for c, size in ((16, 32), (32, 16), (64, 8)):
        x = torch.randn(batch, 3, 32, 32, generator=gen)
        g = torch.randn(batch, c, size, size, generator=gen)
        torch.manual_seed(0)
        encoders = {False: InputEncoder((3, 32, 32), (c, size, size), channels_last=False)}
        encoders[True] = InputEncoder((3, 32, 32), (c, size, size), channels_last=True)
        encoders[True].load_state_dict(encoders[False].state_dict())
        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(rounds):
            for layout in ((False, True) if i % 2 == 0 else (True, False)):
                encoder = encoders[layout]
                encoder.zero_grad(set_to_none=True)
                start = time.perf_counter()
                (encoder(x) * g).sum().backward()
                times[layout].append(1000.0 * (time.perf_counter() - start))
        out.append(
            {
                "target": [c, size, size],
                "contiguous_ms": statistics.median(times[False][2:]),
                "channels_last_ms": statistics.median(times[True][2:]),
            }
        )
    return out


def multiply_adds(module: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of the convolutions and linear layers of one forward pass of ``module``."""
    total = 0

    def hook(m: nn.Module, inputs: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += out.numel() * m.in_features

    hooks = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        module(x)
    for h in hooks:
        h.remove()
    return total


def arithmetic(k: int = 16) -> dict:
    """Per image, forward multiply-adds of ResNet-32's blocks, auxiliary heads and input encoders."""
    out = {}
    for encoder in ("paper", "pooled", "fast"):
        r = cifar_like("cifar_resnet32", k, "E", encoder=encoder, batch=1)
        seed_everything(0)
        built = build_network(r)
        x = torch.randn(1, 3, 32, 32)
        hs = built.network.module_outputs(x)
        blocks = sum(multiply_adds(m.body, torch.randn(1, *p.input_shape)) for m, p in zip(built.network.blocks, built.plans))
        heads = sum(multiply_adds(m.head, h) for m, h in zip(built.network.blocks[:-1], hs[:-1]))
        encoders = sum(multiply_adds(m.adapters["x"], x) for m in built.network.blocks if "x" in m.adapters)
        out[encoder] = {"blocks": blocks, "heads": heads, "encoders": encoders}
    return out


def time_section(k: int = 16, steps: int = 5, warmup: int = 1, batch: int = 128) -> dict:
    """Median step time of each variant on ResNet-32, all variants alternating round-robin."""
    strategies: dict[str, Any] = {}
    variants = [(*v, False) for v in TIME_VARIANTS]
    variants += [(name + WHOLE, c, e, False, True) for name, c, e, _ in TIME_VARIANTS if name in CHANNELS_LAST_RUNS]
    for name, context, encoder, contiguous, whole in variants:
        e2e = name.startswith("end-to-end")
        r = cifar_like("cifar_resnet32", 1 if e2e else k, context, encoder=encoder, batch=batch)
        seed_everything(0)
        net = build_network(r).network
        if whole:
            net = net.to(memory_format=torch.channels_last)
        if contiguous:
            for m in net.blocks:
                if "x" in m.adapters:
                    m.adapters["x"].channels_last = False
        cls = EndToEndStrategy if e2e else GreedyStrategy
        strategies[name] = cls(net, r.optimizer.create(), r.schedule.create(), 1000, 1000)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(2))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {name: [] for name in strategies}
    names = list(strategies)
    for i in range(warmup + steps):
        order = names[i % len(names):] + names[: i % len(names)]  # rotate who goes first
        for name in order:
            s = strategies[name]
            start = time.perf_counter()
            s.step(x_cl if name.endswith(WHOLE) else x, y, StepStats(s.network.num_modules), lambda module, loss: None)
            if i >= warmup:
                times[name].append(1000.0 * (time.perf_counter() - start))
        say(f"  time round {i + 1}/{warmup + steps}")
    return {
        "k": k, "batch": batch, "steps": steps, "warmup": warmup, "threads": torch.get_num_threads(),
        "ms": {name: statistics.median(v) for name, v in times.items()},
        "all_ms": times,
        "multiply_adds": arithmetic(k),
        "encoder_layouts": encoder_layouts(batch),
    }


# -- against activation checkpointing ---------------------------------------------------------

CHECKPOINT_RECIPE = "benchmarks/resnet32_k16.toml"
# the variant with the heads recomputed too, beside the bench's own context.recompute one
HEADS_LABEL, HEADS_OVERRIDES = "recompute + heads", ("context.recompute=true", "context.recompute_head=true")
HEADS_FLAG = f"--variant '{HEADS_LABEL}:{';'.join(HEADS_OVERRIDES)}'"
DGL_LABEL, DGL_OVERRIDES = "DGL", ("context.use=none",)  # local heads only: the efficiency target's third row
DGL_FLAG = f"--variant '{DGL_LABEL}:{';'.join(DGL_OVERRIDES)}'"
CHECKPOINT_STEPS = 8  # timed steps of each configuration: the recompute ratio's target is within a few % of it
CHECKPOINT_COMMAND = (
    f"OMP_NUM_THREADS=1 contsup bench {CHECKPOINT_RECIPE} --steps {CHECKPOINT_STEPS} --warmup 1 --recompute {HEADS_FLAG} {DGL_FLAG}"
)
EFFICIENCY_TARGET = 0.9  # achieved FLOP/s over end-to-end's, for DGL, R1E and R1E with recompute
FAST_SEGMENTS = 8  # the best checkpointing configuration of the section above on this network
FAST_COMMAND = (
    f"OMP_NUM_THREADS=1 contsup bench {CHECKPOINT_RECIPE} --set context.encoder=fast --steps {CHECKPOINT_STEPS} --warmup 1 "
    f"--segments {FAST_SEGMENTS} --recompute {HEADS_FLAG}"
)
EAGER_LABEL = "uncompiled"
COMPILE_STEPS = 5
COMPILE_COMMAND = (
    f"OMP_NUM_THREADS=1 contsup bench {CHECKPOINT_RECIPE} --set run.compile=true --variant '{EAGER_LABEL}:run.compile=false' "
    f"{DGL_FLAG} --segments none --steps {COMPILE_STEPS} --warmup 1"
)
COMPILE_PROFILE = (
    "OMP_NUM_THREADS=1 python benchmarks/adapter_ops.py --config uncompiled=run.compile=false --config compiled=run.compile=true"
)
COMPILE_TARGET = 1.3  # the uncompiled R1E step over the compiled one
# the official ContSup code, R1E, K=16, as first measured (CPU, one thread); the "official" section
# (benchmarks/official_code.py) measures it again beside contsup, in one process
OFFICIAL_CODE = {"step_time": 3.99, "peak_mib": 111.6}
OFFICIAL_COMMAND = "OMP_NUM_THREADS=1 python benchmarks/official_code.py CHECKOUT --json official_code.json"


def checkpointing_section(steps: int = CHECKPOINT_STEPS, warmup: int = 1) -> dict:
    """``contsup bench`` of ResNet-32 K=16 R1E (official adapters): end-to-end, greedy (with and
    without ``context.recompute``) and end-to-end under torch.utils.checkpoint over S = 2, 4, 8,
    K, sqrt(units) groups."""
    recipe = load_recipe(ROOT / CHECKPOINT_RECIPE, registries=registries())
    heads = load_recipe(ROOT / CHECKPOINT_RECIPE, list(HEADS_OVERRIDES), registries=registries())
    dgl = load_recipe(ROOT / CHECKPOINT_RECIPE, list(DGL_OVERRIDES), registries=registries())
    return run_bench(recipe, steps=steps, warmup=warmup, recompute=True, variants=[(HEADS_LABEL, heads), (DGL_LABEL, dgl)])


def compile_section(steps: int = COMPILE_STEPS, warmup: int = 1) -> dict:
    """``contsup bench`` of the same recipe with run.compile = true: end to end, greedy R1E and DGL
    compiled, beside the uncompiled R1E step, in one process."""
    compiled = load_recipe(ROOT / CHECKPOINT_RECIPE, ["run.compile=true"], registries=registries())
    eager = load_recipe(ROOT / CHECKPOINT_RECIPE, ["run.compile=false"], registries=registries())
    dgl = load_recipe(ROOT / CHECKPOINT_RECIPE, ["run.compile=true", *DGL_OVERRIDES], registries=registries())
    return run_bench(compiled, steps=steps, warmup=warmup, segments=[], variants=[(EAGER_LABEL, eager), (DGL_LABEL, dgl)])


def compile_speedup(result: dict) -> float | None:
    """The uncompiled R1E step over the compiled one, in the compile section's run."""
    eager = labelled(result, EAGER_LABEL)
    return eager["step_ms_median"] / result["greedy"]["step_ms_median"] if eager else None


def compile_table(result: dict, meta: dict) -> list[str]:
    g, e = result["greedy"], result["e2e"]
    lines = [
        f"Command: `{COMPILE_COMMAND}`. Machine: {result.get('machine', meta['machine'])}. The recipe of the section "
        "above with `run.compile = true`: end-to-end (the plain backbone), greedy R1E and DGL each under "
        "`torch.compile` as training compiles them (every module's adapters, body and head a graph of its own), "
        f"beside the same greedy R1E uncompiled, in one process; {result['steps']} steps after {result['warmup']} "
        "warm-up and the compiling step. Memory and FLOPs are counted on uncompiled copies.",
        "",
        *MARKDOWN_HEADER,
    ]
    lines += [f"| {' | '.join(r)} |" for r in configuration_rows(result)[: len(configurations(result))]] + [""]
    speedup = compile_speedup(result)
    if speedup is not None and "compile_s" in g:
        lines += [
            f"Compiling took the first step {e['compile_s']:.0f} s longer end to end and {g['compile_s']:.0f} s "
            "greedy (torch keeps compiled kernels in an on-disk cache across runs, so this depends on what earlier "
            f"runs left there; with an empty cache it is minutes). The compiled R1E step is {speedup:.2f}x as fast as the uncompiled one"
            + (f" (the target is {COMPILE_TARGET}x). " if speedup >= COMPILE_TARGET else why_not_compiled(speedup)),
            "",
        ]
    return lines


def why_not_compiled(speedup: float) -> str:
    """What bounds the compiled greedy step, where it misses the target (from the profile command)."""
    return (
        f", short of the {COMPILE_TARGET}x target. `{COMPILE_PROFILE}` shows what bounds it, operator by "
        "operator: the convolutions, forward and backward, which take most of the step, run the same oneDNN "
        "kernels compiled or not; what compiling can change is the adapters' batch norm, ReLU and pooling at the "
        "input's resolution, and on one CPU thread its generated kernels for them are no faster than ATen's, "
        "while the adaptive pooling's backward and the layout changes around the channels-last encoder cost "
        "more copies. On such a CPU run.compile does not pay for greedy training with these adapters; on a GPU, "
        "where those layers are bound by launches and bandwidth, `benchmarks/gpu_check.sh` measures the same rows."
    )


def official_table(o: dict) -> list[str]:
    lines = [
        f"Command: `{OFFICIAL_COMMAND}`, CHECKOUT a clone of the official ContSup code (github.com/Tab-ct/ContSup). "
        f"Machine: {o['machine']}. Its training forward (the whole greedy step) against contsup's greedy step of the "
        f"recipe above and end-to-end training, {o['rounds']} rounds in rotating order, one batch of 128, one "
        "thread; the same live meter for all.",
        "",
        "| configuration | peak kept for backward (MiB) | median step (ms) | step / end-to-end |",
        "| --- | --- | --- | --- |",
    ]
    for name, r in o["rows"].items():
        lines.append(f"| {name} | {mib(r['peak_bytes'])} | {r['step_ms_median']:.0f} | {r['step_time_ratio']:.2f} |")
    return lines + [""]


def efficiency_notes(result: dict) -> str:
    """Work against time: what the efficiency column says, and what bounds it."""
    g, e = result["greedy"], result["e2e"]
    work = lambda f: f["flops_per_step"] / e["flops_per_step"]  # noqa: E731
    rate = lambda f: f["flops_per_s"] / e["flops_per_s"]  # noqa: E731 - the efficiency
    dgl = labelled(result, DGL_LABEL)
    said = f"R1E does {work(g):.2f}x end-to-end's FLOPs at {rate(g):.2f} of its FLOP rate"
    if dgl:
        said += f", DGL {work(dgl):.2f}x at {rate(dgl):.2f}"
    effs = [rate(c) for c in result.get("checkpointing", []) if c.get("flops_per_s")]
    ckpt = (f" Checkpointing's efficiency is {min(effs):.2f} to {max(effs):.2f}: its recomputed batch norm and ReLU "
            "are not counted either.") if effs else ""
    return (
        f"Work against time (the last three columns): {said}. Convolutions take the same time per FLOP in "
        "every configuration; what the count leaves out sets the efficiency. "
        "`OMP_NUM_THREADS=1 python benchmarks/adapter_ops.py --config DGL=context.use=none --config R1E=` "
        "shows it operator by operator: R1E's extra time over DGL is the adapters' convolutions (counted) and "
        "their batch norm, ReLU and adaptive pooling at the input's 32x32 (counted as nothing), memory-bound "
        "layers over the largest tensors of the step (a 64-channel module's: 32 MiB at batch 128); the "
        f"optimizer steps of all modules are well under 1 % of the step.{ckpt} Removing that gap needs fused "
        "normalisation layers (what `run.compile` tries, below) or a lighter encoder (`context.encoder = "
        "\"fast\"`, the section after next)."
    )


def recompute_notes(result: dict) -> str:
    """What ``context.recompute`` buys on this network and what bounds it."""
    g, rc, e = result["greedy"], result["greedy_recompute"], result["e2e"]
    batch, (c, h, w) = result["batch_size"], result["input_shape"]
    widest = 64  # the last stage's channels: the widest M_E output, at x's full size
    whole = batch * (2 * 12 + 2 * widest) * h * w * 4  # conv and ReLU outputs of both layers
    chunked = batch * (2 * 12 + 2 * 16) * h * w * 4  # the first layer, and 16 channels of the second
    text = (
        f"With `context.recompute = true` the adapters keep nothing through the forward: the peak goes from "
        f"{mib(g['peak_bytes'])} to {mib(rc['peak_bytes'])} MiB (end-to-end / peak {e['peak_bytes'] / g['peak_bytes']:.2f} "
        f"to {e['peak_bytes'] / rc['peak_bytes']:.2f}) for {rc['step_ms_median'] / g['step_ms_median']:.2f}x the step. "
        "The official M_E works at x's full size whatever the module's size. Recomputed whole, it would bring "
        f"back both layers' batch-norm inputs and ReLU outputs at {h}x{w} while backward runs: for a {widest}-channel "
        f"module {2 * 12 + 2 * widest} channels, {mib(whole)} MiB at batch {batch}, more than any module's forward keeps. "
        "So its backward recomputes the first layer whole and the second 16 output channels at a time "
        f"(`contsup.adapters.InputEncoder.recompute_lean`): {2 * 12 + 2 * 16} channels, {mib(chunked)} MiB."
    )
    if "live_peak_forward_bytes" in rc:
        text += (
            f" The peak is now the forward's ({mib(rc['live_peak_forward_bytes'])} MiB, a first-stage module's units, "
            f"head and context at {h}x{w}); the most backward holds is {mib(rc['live_peak_backward_bytes'])} MiB."
        )
    both = heads_variant(result)
    if both:
        text += (
            f" With `recompute_head = true` as well (the row {HEADS_LABEL}), the heads keep their input and pooled "
            "features and make their conv layer again 16 channels at a time in backward: "
            f"{mib(both['peak_bytes'])} MiB (end-to-end / peak {e['peak_bytes'] / both['peak_bytes']:.2f}) for "
            f"{both['step_ms_median'] / g['step_ms_median']:.2f}x the step without recompute."
        )
    return text


def fast_section(steps: int = CHECKPOINT_STEPS, warmup: int = 1) -> dict:
    """The same with the fast encoder, beside checkpointing over FAST_SEGMENTS groups."""
    recipe = load_recipe(ROOT / CHECKPOINT_RECIPE, ["context.encoder=fast"], registries=registries())
    heads = load_recipe(ROOT / CHECKPOINT_RECIPE, ["context.encoder=fast", *HEADS_OVERRIDES], registries=registries())
    return run_bench(recipe, steps=steps, warmup=warmup, segments=[FAST_SEGMENTS], recompute=True, variants=[(HEADS_LABEL, heads)])


def labelled(result: dict, label: str) -> dict | None:
    """The figures of the variant ``label`` of a bench result, where it has one."""
    return next((v for v in result.get("variants", []) if v.get("label") == label), None)


def heads_variant(result: dict) -> dict | None:
    """The figures of the recompute + heads variant, where the result has it."""
    return labelled(result, HEADS_LABEL)


def fast_table(result: dict, meta: dict) -> list[str]:
    lines = [
        f"Command: `{FAST_COMMAND}`. Machine: {result.get('machine', meta['machine'])}. The same network with "
        "`context.encoder = \"fast\"`, with and without `context.recompute`, beside checkpointing over "
        f"S = {FAST_SEGMENTS} groups, in one process (ratios within the run). Its digits test error is in the "
        "accuracy table below.",
        "",
        *MARKDOWN_HEADER,
    ]
    measured = configuration_rows(result)[: len(configurations(result))]  # without the summary rows
    lines += [f"| {' | '.join(r)} |" for r in measured] + [""]
    rc = result.get("greedy_recompute", {})
    if "live_peak_forward_bytes" in rc:
        lines += [
            f"With recompute the peak is a first-stage module's forward ({mib(rc['live_peak_forward_bytes'])} MiB: "
            "its block's tensors at the input's resolution, its head's convolution outputs, x and the R1 feature), "
            "which no adapter setting changes"
            + (f"; recompute_head takes the head's part out of it ({mib(heads_variant(result)['peak_bytes'])} MiB)"
               if heads_variant(result) else "")
            + ". The time is the adapters' own layers: the fast M_E and the "
            "official M_R add as many convolution, batch-norm and ReLU layers as the modules' bodies have, at "
            "their resolution, and on one CPU thread those small layers cost memory traffic more than "
            "arithmetic. `OMP_NUM_THREADS=1 python benchmarks/adapter_ops.py` shows where a step's time goes, "
            "by operator, against DGL.",
            "",
        ]
    return lines


def recompute_targets(results: dict) -> list[str]:
    """The rows of the targets table that the two bench sections measure."""
    lines = []
    c, f, o = results.get("checkpointing"), results.get("fast"), results.get("official")
    if o:
        ours, theirs = o["rows"]["contsup R1E"], o["rows"]["official code R1E"]
        ok = ours["peak_bytes"] <= theirs["peak_bytes"] and ours["step_time_ratio"] < theirs["step_time_ratio"]
        lines.append(
            f"| K=16 R1E, official adapters: peak and step below the official code's, in one process | "
            f"{mib(ours['peak_bytes'])} against {mib(theirs['peak_bytes'])} MiB, {ours['step_time_ratio']:.2f}x against "
            f"{theirs['step_time_ratio']:.2f}x | {'yes' if ok else 'no'} |"
        )
    if c and "greedy_recompute" in c:
        g, e, rc = c["greedy"], c["e2e"], c["greedy_recompute"]
        step = g["step_ms_median"] / e["step_ms_median"]
        ok = round(g["peak_bytes"] / MIB, 1) <= OFFICIAL_CODE["peak_mib"] and step < OFFICIAL_CODE["step_time"]
        lines.append(
            f"| K=16 R1E, official adapters: peak <= {OFFICIAL_CODE['peak_mib']} MiB and step below the official code's "
            f"first measured {OFFICIAL_CODE['step_time']}x | {mib(g['peak_bytes'])} MiB, {step:.2f}x | {'yes' if ok else 'no'} |"
        )
        over = rc["step_ms_median"] / g["step_ms_median"]
        reach = e["peak_bytes"] / rc["peak_bytes"]
        lines.append(
            f"| the same with context.recompute: end-to-end / peak >= 5 at a step <= 1.2x that of no recompute | "
            f"{reach:.2f} ({mib(rc['peak_bytes'])} MiB) at {over:.2f}x | {'yes' if reach >= 5 and over <= 1.2 else 'no'} |"
        )
    if c and c["e2e"].get("flops_per_s"):
        named = [("DGL", labelled(c, DGL_LABEL)),
                 ("R1E, official adapters", c["greedy"]), ("R1E + context.recompute", c.get("greedy_recompute"))]
        for what, v in named:
            if v is None or not v.get("flops_per_s"):
                continue
            eff = v["flops_per_s"] / c["e2e"]["flops_per_s"]
            lines.append(
                f"| K=16 {what}: achieved FLOP/s >= {EFFICIENCY_TARGET} of end-to-end's (efficiency) | "
                f"{eff:.2f} ({v['flops_per_step'] / c['e2e']['flops_per_step']:.2f}x the FLOPs in "
                f"{v['step_ms_median'] / c['e2e']['step_ms_median']:.2f}x the time) | {'yes' if eff >= EFFICIENCY_TARGET else 'no'} |"
            )
    speedup = compile_speedup(results["compile"]) if "compile" in results else None
    if speedup is not None:
        lines.append(
            f"| K=16 R1E, run.compile = true: step >= {COMPILE_TARGET}x faster than uncompiled, in one process | "
            f"{speedup:.2f}x | {'yes' if speedup >= COMPILE_TARGET else 'no'} |"
        )
    if f and "greedy_recompute" in f and f.get("checkpointing"):
        e, ck = f["e2e"], f["checkpointing"][0]
        for what, rc in (("context.recompute", f["greedy_recompute"]), ("context.recompute and recompute_head", heads_variant(f))):
            if rc is None:
                continue
            memory = ck["peak_bytes"] / rc["peak_bytes"]
            slower = (rc["step_ms_median"] - ck["step_ms_median"]) / e["step_ms_median"]
            lines.append(
                f"| K=16 R1E, fast encoder + {what}: <= 1/1.5 of the memory of checkpointing S={ck['segments']} "
                f"at <= its step + 0.3x end-to-end | 1/{memory:.2f} ({mib(rc['peak_bytes'])} of {mib(ck['peak_bytes'])} MiB) "
                f"at its step {slower:+.2f}x end-to-end | {'yes' if memory >= 1.5 and slower <= 0.3 else 'no'} |"
            )
    return lines


def checkpointing_table(result: dict, meta: dict) -> list[str]:
    lines = [
        f"Command: `{CHECKPOINT_COMMAND}` (the bench also writes the memory-versus-time figure). "
        f"Machine: {result.get('machine', meta['machine'])}. ResNet-32, batch {result['batch_size']}, 3x32x32, "
        f"ContSup R1E with the official adapters (the default), K={result['modules_k']}; end-to-end is the "
        f"plain backbone; {result['steps']} steps after {result['warmup']} warm-up, every configuration one step "
        "per round in rotating order, in one process: the ratios are within the run.",
        "",
        "Peak kept for backward: the saved tensors alive at the worst moment of the step, counted "
        "over forward and backward, so checkpointing is charged for the segment it recomputes "
        "(`contsup.training.measure.measure_live`); greedy's is the larger of that and its "
        "per-backward figure, which includes the context it keeps. Checkpointing is "
        "`torch.utils.checkpoint` (non-reentrant) over S contiguous groups of the backbone's units.",
        "",
        *MARKDOWN_HEADER,
    ]
    lines += [f"| {' | '.join(r)} |" for r in configuration_rows(result)]
    if "greedy_recompute" in result:
        lines += ["", recompute_notes(result)]
    if result["e2e"].get("flops_per_s"):
        lines += ["", efficiency_notes(result)]
    return lines + [
        "",
        "On a CUDA GPU, `benchmarks/gpu_check.sh` measures `torch.cuda.max_memory_allocated` and the "
        "step of end-to-end, checkpointing (S = K), DGL and ContSup R1E at K = 4 and 16 (ResNet-32 "
        "batch 1024, ResNet-110 batch 128, bf16, channels-last) and, at ResNet-32 K = 4, end-to-end and R1E "
        "compiled (run.compile), runs the "
        "CUDA-only tests and a short training, then the rows of docs/distributed.md's comparison of "
        "contsup's pipeline with torch's pipeline schedules and DDP (`benchmarks/pipeline_schedules.py`, "
        "on that machine's CPU: NCCL gives each process a GPU of its own, which a one-GPU machine does not "
        "have), and writes gpu_check.json and gpu_check.md; without CUDA it says so and exits 0.",
        "",
    ]


# -- accuracy on digits -----------------------------------------------------------------------


ACCURACY_VARIANTS = (
    ("R1E, official adapters", "recipes/digits.toml", ["context.encoder=official", "context.shortcut=official"]),
    ("R1E, paper encoder", "recipes/digits.toml", ["context.encoder=paper"]),
    ("R1E, fast encoder", "recipes/digits.toml", ["context.encoder=fast"]),
    ("R1E, pooled encoder", "recipes/digits.toml", ["context.encoder=pooled"]),
    ("DGL (no context)", "recipes/digits_dgl.toml", []),
    ("end-to-end", "recipes/digits_e2e.toml", []),
)


# -- token models and modern CNNs: the plan's memory -------------------------------------------

TOKEN_RECIPES = (  # (label, recipe, batch the plan is counted at; None: the recipe's own)
    ("ViT on digits (8 blocks, width 64)", "recipes/digits_vit.toml", None),
    ("ViT-S/16 at 224", "recipes/imagenet/vit_small_k4.toml", 8),
    ("ConvNeXt-T at 224", "recipes/imagenet/convnext_tiny_k4.toml", 8),
)
TOKEN_METHODS = (
    ("end-to-end", ['run.mode="e2e"', "partition.modules=1", 'context.use="none"']),
    ("DGL", ['context.use="none"']),
    ("ContSup R1E", []),
)


def tokens_section() -> dict:
    """``contsup plan``'s activation memory for the token and ConvNeXt recipes, end to end, DGL
    and R1E: counted from shapes at a small batch and scaled to the recipe's (activations grow in
    proportion to the batch), with the CPU seconds each plan took."""
    from contsup.tools.plan import plan_data

    rows = []
    for label, path, batch in TOKEN_RECIPES:
        full = load_recipe(ROOT / path).data.batch_size
        for method, overrides in TOKEN_METHODS:
            sets = overrides + ([f"data.batch_size={batch}"] if batch else [])
            say(f"tokens: {path} {method}")
            start = time.process_time()
            data = plan_data(load_recipe(ROOT / path, sets))
            seconds = time.process_time() - start
            mem = data["memory"]
            rows.append({
                "model": label, "recipe": path, "method": method, "overrides": sets, "k": len(data["modules"]),
                "units": [m["units"] for m in data["modules"]], "batch": mem["batch_size"], "recipe_batch": full,
                "largest": mem["largest_module_bytes"], "units_bytes": mem["units_bytes"], "plan_cpu_s": seconds,
                "modules": [{"output_shape": m["output_shape"], "bytes": m["memory"]["bytes"]} for m in data["modules"]],
            })
    return {"rows": rows}


def tokens_table(t: dict, meta: dict) -> list[str]:
    lines = [
        f"Command: `{COMMAND} --sections tokens`, which runs `contsup plan RECIPE --set ...` for each row "
        f"(end-to-end: `--set run.mode=\"e2e\" --set partition.modules=1 --set context.use=\"none\"`; DGL: "
        f"`--set context.use=\"none\"`; ImageNet rows also `--set data.batch_size=8`). Machine: {meta['machine']} "
        "(the figures are the same on any machine). Each module's figure is what training it keeps for backward, "
        "counted from shapes; the ImageNet rows are counted at batch 8 and scaled to the recipe's batch "
        "(saved activations grow in proportion to the batch). End-to-end is the whole network with its head.",
        "",
        "| model | method | K | units per module | largest module, MiB (batch) | at the recipe's batch, MiB | / end-to-end | plan CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    e2e = {r["model"]: r["largest"] for r in t["rows"] if r["method"] == "end-to-end"}
    for r in t["rows"]:
        scale = r["recipe_batch"] / r["batch"]
        lines.append(
            f"| {r['model']} | {r['method']} | {r['k']} | {_sizes(r['units'])} | {mib(r['largest'])} ({r['batch']}) | "
            f"{mib(r['largest'] * scale)} ({r['recipe_batch']}) | {r['largest'] / e2e[r['model']]:.2f} | {r['plan_cpu_s']:.1f} |"
        )
    vit = next((r for r in t["rows"] if r["recipe"].endswith("vit_small_k4.toml") and r["method"] == "ContSup R1E"), None)
    if vit is not None:
        scale = vit["recipe_batch"] / vit["batch"]
        shapes = "; ".join(
            f"module {i}: {'x'.join(map(str, m['output_shape']))} tokens, {mib(m['bytes'] * scale)} MiB"
            for i, m in enumerate(vit["modules"], start=1)
        )
        lines += ["", f"ViT-S/16 with R1E, per module at batch {vit['recipe_batch']} (`contsup plan "
                  f"recipes/imagenet/vit_small_k4.toml` prints the same, counted at that batch): {shapes}."]
    return lines + [""]


def accuracy_section(
    seeds: tuple[int, ...] = (0, 1, 2),
    variants: int = len(ACCURACY_VARIANTS),
    keep: Callable[[dict], None] | None = None,
    previous: dict | None = None,
) -> dict:
    """Final test error and training throughput of the digits recipes (the first ``variants``
    of ACCURACY_VARIANTS), one run per seed, one after another; ``keep`` saves partial results;
    runs found in ``previous`` (same variant and seed) are reused instead of repeated."""
    out: dict[str, Any] = {"seeds": list(seeds), "runs": {}}
    done = {(name, r["seed"]): r for name, runs in (previous or {}).get("runs", {}).items() for r in runs}
    devnull = open(os.devnull, "w")
    for name, path, overrides in ACCURACY_VARIANTS[:variants]:
        runs: list[dict] = []
        out["runs"][name] = runs
        for seed in seeds:
            if (name, seed) in done:
                runs.append(done[(name, seed)])
                continue
            recipe = load_recipe(ROOT / path, [*overrides, f"run.seed={seed}", "run.device=cpu"], registries())
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                history = Trainer(recipe, Path(tmp), log=devnull).fit()
            last = history[-1]
            ips = statistics.mean(m["images_per_s"] for m in history)
            runs.append({"seed": seed, "test_error_pct": last["test_error_pct"], "images_per_s": ips})
            say(f"  {name} seed {seed}: {last['test_error_pct']:.2f}% error, {ips:.0f} img/s "
                f"[{time.perf_counter() - start:.0f}s]")
            if keep is not None:
                keep(out)
    return out


# -- the document -----------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / MIB:.1f}"


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def memory_tables(mem: dict, meta: dict) -> list[str]:
    lines = []
    for backbone, data in mem["backbones"].items():
        label, e2e = data["label"], data["e2e"]
        lines += [
            f"### {label}, batch {mem['batch']}, 3x32x32",
            "",
            f"Command: `{COMMAND} --sections memory`. Machine: {meta['machine']} (the figures are the same on any machine).",
            f"End-to-end training of the plain backbone saves **{mib(e2e)} MiB** for its backward pass.",
            "",
            "| K | context | uniform: sizes | predicted | measured | memory_balanced: sizes | predicted | measured | end-to-end / memory_balanced |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        rows = {(r["k"], r["context"], r["partitioner"]): r for r in data["rows"]}
        for k in KS:
            for context, _, _ in CONTEXTS:
                u, b = rows[(k, context, "uniform")], rows[(k, context, "memory_balanced")]
                lines.append(
                    f"| {k} | {context} | {_sizes(u['sizes'])} | {mib(u['predicted'])} | {mib(u['measured'])} | "
                    f"{_sizes(b['sizes'])} | {mib(b['predicted'])} | {mib(b['measured'])} | {e2e / b['measured']:.2f} |"
                )
        lines.append("")
    return lines


def _sizes(sizes: list[int]) -> str:
    if len(sizes) > 8:
        return ",".join(map(str, sizes[:4])) + ",...," + ",".join(map(str, sizes[-2:]))
    return ",".join(map(str, sizes))


def ratios(t: dict) -> dict[str, float]:
    """Per variant, the median over rounds of its step time over the end-to-end step of the same
    round: robust to the machine's load changing between rounds."""
    e2e = t["all_ms"]["end-to-end"]
    return {name: statistics.median(v / e for v, e in zip(values, e2e)) for name, values in t["all_ms"].items()}


def time_table(t: dict, meta: dict) -> list[str]:
    r = ratios(t)
    lines = [
        f"Command: `{COMMAND} --sections time`. Machine: {meta['machine']}. ResNet-32, batch {t['batch']}, "
        f"3x32x32, K={t['k']} (end-to-end: the plain backbone); {t['steps']} rounds after {t['warmup']} "
        f"warm-up, each round one step of every variant, in rotating order, in one process. The ratio is "
        f"the median over rounds of the variant's step over the end-to-end step of the same round.",
        "",
        "| variant | median step (ms) | / end-to-end |",
        "| --- | --- | --- |",
    ]
    for name, ms in t["ms"].items():
        lines.append(f"| {name} | {ms:.0f} | {r[name]:.2f} |")
    return lines + [""]


def accuracy_table(a: dict, meta: dict) -> list[str]:
    lines = [
        f"Command: `{COMMAND} --sections accuracy`. Machine: {meta['machine']}. The digits recipes "
        f"(ResNet-32 on 16x16 digits, batch 64, 8 epochs; ContSup and DGL with K=16), seeds "
        f"{', '.join(map(str, a['seeds']))}, one run after another. The test set has 360 images: "
        f"one image is 0.28 %. (Each run's images/s is in benchmarks/results.json; it depends on what "
        f"else ran at the time, so speed is compared in the step-time table above.)",
        "",
        "| variant | test error % (mean ± std) | per seed |",
        "| --- | --- | --- |",
    ]
    for name, runs in a["runs"].items():
        errors = [r["test_error_pct"] for r in runs]
        lines.append(f"| {name} | {mean_std(errors)} | {', '.join(f'{e:.2f}' for e in errors)} |")
    return lines + [""]


def targets_table(results: dict) -> list[str]:
    lines = ["| target | measured | met |", "| --- | --- | --- |"]
    mem = results.get("memory")
    if mem:
        r32 = {(r["k"], r["context"], r["partitioner"]): r for r in mem["backbones"]["cifar_resnet32"]["rows"]}
        u, b = r32[(16, "R1E", "uniform")], r32[(16, "R1E", "memory_balanced")]
        err = b["measured"] / b["predicted"] - 1
        lines.append(
            f"| ResNet-32, batch 128, K=16, R1E: measured peak within 10 % of predicted | "
            f"{mib(b['measured'])} MiB measured, {mib(b['predicted'])} MiB predicted ({100 * err:+.1f} %) | "
            f"{'yes' if abs(err) <= 0.10 else 'no'} |"
        )
        ok = b["measured"] <= u["measured"]
        lines.append(
            f"| ResNet-32, batch 128, K=16, R1E: memory_balanced peak <= uniform | "
            f"{mib(b['measured'])} vs {mib(u['measured'])} MiB | {'yes' if ok else 'no'} |"
        )
        pairs = [
            (rows[(k, c, "uniform")], rows[(k, c, "memory_balanced")])
            for data in mem["backbones"].values()
            for rows in [{(r["k"], r["context"], r["partitioner"]): r for r in data["rows"]}]
            for k in KS
            for c, _, _ in CONTEXTS
        ]
        below = sum(b["measured"] <= u["measured"] for u, b in pairs)
        exact = sum(r["measured"] == r["predicted"] for u, b in pairs for r in (u, b))
        lines.append(
            f"| every row of the memory tables: memory_balanced peak <= uniform | {below} of {len(pairs)} rows; "
            f"measured = predicted to the byte in {exact} of {2 * len(pairs)} | {'yes' if below == len(pairs) else 'no'} |"
        )
        r110 = mem["backbones"]["cifar_resnet110"]
        rows = {(r["k"], r["context"], r["partitioner"]): r for r in r110["rows"]}
        for context, _, _ in CONTEXTS:
            m = rows[(4, context, "memory_balanced")]["measured"]
            ratio = r110["e2e"] / m
            lines.append(
                f"| ResNet-110 K=4 memory_balanced, {context}: activations <= 1/3.2 of end-to-end | "
                f"{mib(m)} of {mib(r110['e2e'])} MiB = 1/{ratio:.2f} | {'yes' if ratio >= 3.2 else 'no'} |"
            )
    t = results.get("time")
    if t:
        r = ratios(t)
        for name, limit in (("DGL (no context)", 1.10), ("R1E, fast encoder", 1.25), ("R1E, pooled encoder", 1.25), ("R1E, paper encoder", None)):
            ratio = r[name]
            met = "-" if limit is None else ("yes" if ratio <= limit else "no")
            goal = f"<= {limit:.2f}x end-to-end" if limit else "reported (the paper's GPU figure: 1.70x)"
            lines.append(f"| step time K=16, {name}: {goal} | {ratio:.2f}x | {met} |")
    return lines + recompute_targets(results) + [""]


STATIC_HEAD = """# Performance

This page is generated by `{command}` (last run: {date}; torch {torch}). Do not edit it by hand:
rerun the command, or one section of it with `--sections memory|time|checkpointing|fast|compile|accuracy|tokens`.

## How memory is measured

contsup counts what a training step keeps alive for backward: the unique storages autograd saves
(`torch.autograd.graph.saved_tensors_hooks`), leaving out parameters and buffers and counting a
storage shared by views or in-place ops once, plus the context tensors the greedy loop keeps for
later modules. This count is exact and deterministic: the same on every machine and every run,
so it is the memory figure of this page. A module's figure includes its units, its auxiliary
head, its context adapters, its input and the context it keeps (`contsup profile RECIPE` shows
the breakdown). "Predicted" is composed from pieces measured one by one (`contsup.model.costs`),
"measured" is counted during a real greedy step: they agree to the byte.

On CPU the process's peak resident set size (`contsup bench` reports it) is a poor substitute:
it only grows within a process and includes the allocator's caches, parameters, gradients and
the optimizer's state. On CUDA `contsup bench` also reports `torch.cuda.max_memory_allocated`
per step, which adds gradients and temporaries to the saved tensors.

Timings depend on the machine and on what else runs on it (rerun them where you will train);
memory figures do not vary at all.

## How work is measured

`contsup bench` also counts each configuration's floating-point operations per training step with
`torch.utils.flop_counter.FlopCounterMode`: one real step of the configuration, run on a copy of
it so that nothing it trains moves, forward, backward and whatever backward recomputes
(checkpointing's segments, `context.recompute`'s adapters). The counter sees matrix products and
convolutions only; elementwise work (batch norm, ReLU, the optimizer's update) counts 0, so a
configuration made of many small elementwise layers does more work than its count says. Its
achieved FLOP/s is that count over its median step; its **efficiency** is its FLOP/s over
end-to-end's in the same run. A greedy step that takes 3x end-to-end's time with an efficiency of
1 does 3x the arithmetic at the same speed; an efficiency of 0.5 means it runs its arithmetic at
half end-to-end's rate (small convolutions, per-module overhead, memory traffic): the part that
faster code, not a different method, can win back. FLOP counts do not depend on the machine; FLOP/s
and efficiency do. Counting runs after the timed steps; a configuration the counter cannot follow
keeps its other figures, its FLOP cells show - and the bench warns which one it was.
"""


def render(results: dict) -> str:
    meta = results["meta"]
    lines = [STATIC_HEAD.format(command=COMMAND, date=meta["date"], torch=meta["torch"]), "## Targets", ""]
    lines += targets_table(results)
    if "memory" in results:
        lines += [
            "## Activation memory: greedy peak against end-to-end",
            "",
            "The peak is the largest module's figure, in MiB. memory_balanced cuts where the measured "
            "costs (each module's own head, adapters and kept context included) are most even; the "
            "paper's input encoder runs at the input's resolution with the module's channel count, so "
            "a late module's encoder can outweigh its blocks.",
            "",
        ]
        r110 = {(r["k"], r["context"], r["partitioner"]): r for r in results["memory"]["backbones"]["cifar_resnet110"]["rows"]}
        ours = ", ".join(map(str, r110[(4, "none", "memory_balanced")]["sizes"]))
        lines += [
            "For comparison, the official ContSup code's memory-balanced cut of ResNet-110 at K=4 "
            "(after [stage, block] (1,6), (1,14), (2,8), blocks counted from 0 within a stage, the reading under which "
            f"the official equal tables are the uniform split) is 8, 8, 12, 27 units (partition.use = \"cuts\", "
            f"recipes/paper/figure4/); contsup's, without context, is {ours}.",
            "",
        ]
        lines += memory_tables(results["memory"], results["memory_meta"])
    if "time" in results:
        lines += ["## Step time and the input encoder", ""]
        lines += time_table(results["time"], results["time_meta"])
        lines += [time_notes(results["time"])]
    if "checkpointing" in results:
        lines += ["## Against activation checkpointing", ""]
        lines += checkpointing_table(results["checkpointing"], results["checkpointing_meta"])
    if "official" in results:
        lines += ["### The official code in the same process", ""]
        lines += official_table(results["official"])
    if "fast" in results:
        lines += ["### The fast encoder with recompute", ""]
        lines += fast_table(results["fast"], results["fast_meta"])
    if "compile" in results:
        lines += ["### Under torch.compile", ""]
        lines += compile_table(results["compile"], results["compile_meta"])
    if "accuracy" in results:
        lines += ["## Accuracy of the input encoders on digits", ""]
        lines += accuracy_table(results["accuracy"], results["accuracy_meta"])
    if "tokens" in results:
        lines += ["## Vision transformers and ConvNeXt: greedy peak against end-to-end", ""]
        lines += tokens_table(results["tokens"], results["tokens_meta"])
    return "\n".join(lines).rstrip() + "\n"


def time_notes(t: dict) -> str:
    """What the step times say, with the figures of this run."""
    ms = t["all_ms"]
    r = ratios(t)
    paired = zip(ms["R1E, paper encoder, contiguous layout"], ms["R1E, paper encoder"])
    contiguous = statistics.median(a / b for a, b in paired)
    layouts = "; ".join(
        f"{'x'.join(map(str, e['target']))}: {e['contiguous_ms']:.0f} ms contiguous, {e['channels_last_ms']:.0f} ms channels-last"
        for e in t.get("encoder_layouts", [])
    )
    faster = {
        name: statistics.median(a / b for a, b in zip(ms[name], ms[name + WHOLE]))
        for name in CHANNELS_LAST_RUNS if name + WHOLE in ms
    }
    whole_layout = (
        "\nThe whole network in channels-last format (`run.channels_last = true`) also computes the same\n"
        "function up to rounding, and on this CPU every variant ran faster in it: the contiguous step took "
        + ", ".join(f"{v:.2f}x ({k})" for k, v in faster.items())
        + " the time of the channels-last one (median over rounds). So it is worth setting for CPU runs, but it\n"
        "does not narrow greedy training's ratio to end-to-end, which gains most (the table's\n"
        "`run.channels_last` rows are divided by the contiguous end-to-end step)."
        if faster else ""
    )
    m = t.get("multiply_adds")
    if m:
        blocks = m["paper"]["blocks"]
        share = {enc: v["encoders"] / blocks for enc, v in m.items()}
        heads = (
            f"Per image, ResNet-32's blocks take {blocks / 1e6:.1f} M forward multiply-adds and its "
            f"{t['k'] - 1} auxiliary heads {m['paper']['heads'] / 1e6:.1f} M ({m['paper']['heads'] / blocks:.2f} of the blocks); "
            f"the input encoders take {share['paper']:.2f} (paper), {share['pooled']:.2f} (pooled) and "
            f"{share['fast']:.2f} (fast) of the blocks' work."
        )
    else:
        heads = ""
    return f"""Where the time goes. The greedy loop itself saves work: a module's input needs no gradient,
so each module's first convolution skips its input gradient. But every module but the last
also trains the paper's auxiliary head (a 3x3 convolution, stride 2 and twice the channels in
the first two stages, then pooling and two linear layers).

{heads}

On a CPU, where time follows arithmetic, the heads set the floor of greedy training: DGL runs
at {r["DGL (no context)"]:.2f}x end-to-end here. Context supply then costs more than its adapters'
arithmetic: once context is added, a module's input carries gradient to the adapters, so its
first convolution computes its input gradient again (what DGL saved), and batch norm, ReLU,
pooling and the additions run at the module input's size. That is why even the fast encoder,
whose arithmetic is small, stays well above DGL; no encoder with trainable adapters avoids it.

The paper's M_E runs two 3x3 convolutions at the input's resolution with the module's channel
count, in every module (R1E with the paper's encoder: {r["R1E, paper encoder"]:.2f}x end-to-end).
What an exact implementation can and cannot save:

- channels-last memory format computes the same function (up to rounding) and on CPU the
  paper's encoder uses it: the encoder alone, forward and backward at batch {t["batch"]} for each of
  ResNet-32's target shapes, took {layouts or "(not measured)"}; in the whole step, the contiguous
  layout took {contiguous:.2f}x the time (median over rounds).
  It does not pay for the pooled and fast encoders, whose convolutions are small;
- fusing BatchNorm into the convolution is exact only in evaluation: in training BN normalises
  by the current batch's statistics at full resolution, so both convolutions must run there;
- the pooling cannot move before the convolutions (BN and ReLU sit between them), unlike M_R's;
- sharing the first convolution across modules (all read the same x) is exact but keeps every
  module's first-layer activations alive through the whole step, against the point of greedy
  training, and that layer is cheap anyway (3 input channels).
{whole_layout}

So the paper's encoder stays the default and exact, and two opt-in encoders trade exactness
for speed: `encoder = "pooled"` pools x to h's size first and then runs the paper's two layers there
({r["R1E, pooled encoder"]:.2f}x); `encoder = "fast"` pools first and runs a single 3x3 conv+BN+ReLU from
x's channels to h's ({r["R1E, fast encoder"]:.2f}x). In the first stage h is as large as x, so pooling
saves nothing there; the fast encoder's single narrow layer is what makes it cheap everywhere.
Both also shrink the encoder's activations (the memory tables' "R1E, fast encoder" rows).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sections", default="memory,time,checkpointing,fast,accuracy,tokens",
        help="comma list of memory, time, checkpointing, fast, accuracy, tokens (and compile, which needs a C compiler "
        "and minutes of compiling; and official, with --official-json)"
    )
    parser.add_argument(
        "--checkpointing-json", metavar="PATH",
        help="checkpointing: take the section from the JSON of the contsup bench command it names instead of running it",
    )
    parser.add_argument(
        "--fast-json", metavar="PATH", help="fast: take the section from the JSON of the contsup bench command it names",
    )
    parser.add_argument(
        "--compile-json", metavar="PATH", help="compile: take the section from the JSON of the contsup bench command it names",
    )
    parser.add_argument(
        "--official-json", metavar="PATH", help="official: the JSON benchmarks/official_code.py wrote (needs a checkout "
        "of the official code, so it is never run from here)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant in the time section")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first in the time section")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the accuracy section")
    parser.add_argument(
        "--accuracy-variants", type=int, default=len(ACCURACY_VARIANTS),
        help="run only the first N variants of the accuracy section (official adapters, paper, fast, pooled encoders, DGL, end-to-end)",
    )
    parser.add_argument("--resume", action="store_true", help="accuracy: reuse runs already in the results file")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    parser.add_argument("--results", default=str(RESULTS), help="the JSON file of raw results (read, updated, written)")
    parser.add_argument("--out", default=str(DOC), help="the Markdown file to write")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"memory", "time", "checkpointing", "fast", "compile", "official", "accuracy", "tokens"}
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    if "official" in sections and not args.official_json:
        parser.error("the official section needs --official-json (the output of benchmarks/official_code.py)")
    if args.threads:
        torch.set_num_threads(args.threads)
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    meta = {"machine": machine(), "date": datetime.date.today().isoformat(), "torch": torch.__version__}
    results["meta"] = meta
    def keep(section: str, data: dict) -> None:
        results[section] = data
        results[f"{section}_meta"] = meta
        atomic_write(results_path, lambda f: json.dump(results, f, indent=1), binary=False)

    runners: dict[str, Callable[[], dict]] = {
        "memory": memory_section,
        "time": lambda: time_section(steps=args.steps, warmup=args.warmup),
        "checkpointing": lambda: (
            json.loads(Path(args.checkpointing_json).read_text()) if args.checkpointing_json else checkpointing_section()
        ),
        "fast": lambda: json.loads(Path(args.fast_json).read_text()) if args.fast_json else fast_section(),
        "compile": lambda: json.loads(Path(args.compile_json).read_text()) if args.compile_json else compile_section(),
        "official": lambda: json.loads(Path(args.official_json).read_text()),
        "accuracy": lambda: accuracy_section(
            tuple(int(s) for s in args.seeds.split(",")), args.accuracy_variants, lambda d: keep("accuracy", d),
            results.get("accuracy") if args.resume else None,
        ),
        "tokens": tokens_section,
    }
    for section in sections:
        say(f"section {section}")
        keep(section, runners[section]())
    atomic_write(Path(args.out), lambda f: f.write(render(results)), binary=False)
    say(f"wrote {args.out} and {results_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

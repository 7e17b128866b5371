"""``contsup bench``: end-to-end against the recipe's greedy training, in one process, alternating.

Beside the two, end-to-end under activation checkpointing (``torch.utils.checkpoint`` over S
contiguous groups of the backbone's units: S = K and a few more, the best one reported), what a
user who only wants memory would pick instead; its memory is the live peak of the saved tensors
over the whole step, recomputation in backward included (:func:`measure_live`).

All train from the same initial backbone weights on the same batches. Memory: the saved-tensor
bytes alive for the largest backward pass (exact and deterministic on any device; the main
figure on CPU), the process's peak resident set size on CPU and the peak CUDA allocation on a
GPU. Time: the median step over N steps after a warm-up, the two strategies alternating (and
swapping which goes first) so that a busy machine slows both alike. Work: each configuration's
FLOPs per step (forward, backward and recomputation, counted on a copy of it), its achieved
FLOP/s (FLOPs over the median step) and its efficiency, that rate over end to end's: below 1, it
does its arithmetic more slowly than end to end does, whatever the amount.
"""

from __future__ import annotations

import contextlib
import copy
import math
import platform
import resource
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Iterator, Literal, Sequence, TextIO

import attrs
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from contsup.errors import first_line
from contsup.model.build import recipe_parts
from contsup.model.costs import CostModel
from contsup.training.compiling import compile_network, compile_pieces
from contsup.training.measure import measure_flops, measure_live, measure_step
from contsup.training.device import resolve_device, seed_everything
from contsup.training.loaders import make_loaders
from contsup.training.strategies import CheckpointStrategy, EndToEndStrategy, GreedyStrategy, StepStats
from contsup.model.components import training_method
from contsup.model.network import build_network
from contsup.types import Costs
from contsup.config.recipe import Recipe

Baseline = Literal["backbone", "recipe"]


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (it never goes down)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def machine() -> str:
    """One line naming the machine: CPU model and cores, or the GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = torch.get_num_threads()
    text = f"{cpu}, {cores} cores available, {threads} torch thread{'' if threads == 1 else 's'}"
    if torch.cuda.is_available():
        text += f"; {torch.cuda.get_device_name()}"
    return text


def _batches(recipe: Recipe, device: torch.device, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` training batches of the recipe's seeded loader (cycled if fewer)."""
    loader, _, _ = make_loaders(attrs.evolve(recipe, data=attrs.evolve(recipe.data, workers=0)), recipe.dataset.create(), device)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    while len(out) < count:
        before = len(out)
        for x, y in loader:
            out.append((x.to(device), y.to(device)))
            if len(out) == count:
                break
        if len(out) == before:
            raise ValueError("the recipe's training set is empty")
    return out


def default_segments(units: int, k: int) -> list[int]:
    """The checkpointing segment counts tried: 2, 4, 8, K and sqrt(units), those that fit."""
    wanted = {2, 4, 8, k, max(1, round(math.sqrt(units)))}
    return sorted(s for s in wanted if 1 <= s <= units)


RECOMPUTE = "context.recompute"  # the label of the variant `--recompute` adds


@attrs.define
class Contender:
    """One configuration measured by the bench: its strategy and what was measured of it."""

    name: str  # "greedy", "e2e", "ckpt<S>" or "variant:<label>"
    strategy: Any
    saved: list[int] | None = None  # saved-tensor bytes alive per backward pass (measure_step)
    live: dict[str, int] = attrs.field(factory=dict)  # the live peak over the step (measure_live)
    times: list[float] = attrs.field(factory=list)  # milliseconds per timed step
    cuda: list[tuple[int, int]] = attrs.field(factory=list)  # per step: CUDA peak, peak over what was there
    rss: int | None = None  # the process's peak RSS once it ran (CPU)
    flops: int = 0  # floating-point operations of one step (measure_flops, on a copy)
    compiled: bool = False  # run.compile: trained under torch.compile (a variant's own recipe says)
    twin: Any = None  # run.compile: an uncompiled copy, which the memory meters and the FLOP counter watch
    first_step_s: float | None = None  # run.compile: the first step, compilation included


@attrs.frozen
class Field:
    """What the bench trains: the contenders (greedy first, end to end second) and their shapes."""

    contenders: dict[str, Contender]
    sizes: list[int]  # the recipe's split
    segments: list[int]  # checkpointing's segment counts
    variants: list[tuple[str, Recipe]]
    variant_sizes: dict[str, list[int]]
    input_shape: list[int]


def _field(
    recipe: Recipe, baseline: Baseline, device: torch.device, total: int, segments: Sequence[int] | None,
    variants: Sequence[tuple[str, Recipe]], recompute: bool,
) -> Field:
    """The recipe's greedy training, end to end (the plain backbone or the recipe's network),
    checkpointing over S segments and the variants, all from the same initial backbone weights."""
    seed_everything(recipe.run.seed)
    built = build_network(recipe)
    n = len(built.unit_shapes)
    plain = attrs.evolve(recipe, partition=attrs.evolve(recipe.partition, modules=1))
    if baseline == "backbone":
        seed_everything(recipe.run.seed)  # the backbone is built first: the same initial weights
        e2e_net = build_network(plain, costs=Costs.uniform(n)).network
    elif baseline == "recipe":
        e2e_net = copy.deepcopy(built.network)
    else:
        raise ValueError(f"baseline must be 'backbone' or 'recipe', got {baseline!r}")
    seed_everything(recipe.run.seed)
    ckpt_net = build_network(plain, costs=Costs.uniform(n)).network.to(device).train()
    segments = default_segments(n, recipe.partition.modules) if segments is None else sorted(set(segments))
    if recompute:
        again = attrs.evolve(recipe, context_options=attrs.evolve(recipe.context_options, recompute=True))
        variants = [*variants, (RECOMPUTE, again)]
    optimizer, schedule = recipe.optimizer.create(), recipe.schedule.create()
    compiled = recipe.run.compile
    contenders = {
        "greedy": Contender("greedy", greedy_strategy(recipe, built.network.to(device).train(), total), compiled=compiled),
        "e2e": Contender("e2e", EndToEndStrategy(e2e_net.to(device).train(), optimizer, schedule, total, total), compiled=compiled),
    }
    for s in segments:
        contenders[f"ckpt{s}"] = Contender(f"ckpt{s}", CheckpointStrategy(ckpt_net, optimizer, schedule, total, total, s), compiled=compiled)
    variant_sizes: dict[str, list[int]] = {}
    for label, variant in variants:
        seed_everything(variant.run.seed)
        vbuilt = build_network(variant)
        variant_sizes[label] = [p.units for p in vbuilt.plans]
        name = f"variant:{label}"
        contenders[name] = Contender(name, greedy_strategy(variant, vbuilt.network.to(device).train(), total), compiled=variant.run.compile)
    _compile(contenders)
    sizes = [p.units for p in built.plans]
    return Field(contenders, sizes, segments, list(variants), variant_sizes, list(built.info.input_shape))


def _compile(contenders: dict[str, Contender]) -> None:
    """run.compile: every compiled contender under torch.compile the same way (greedy's and end to
    end's module pieces, checkpointing's units), each keeping an uncompiled twin for the meters.
    The recipe decides for greedy, end to end and checkpointing; each variant's own recipe for it
    (``--variant 'eager:run.compile=false'`` puts the uncompiled step beside the compiled one)."""
    chosen = [c for c in contenders.values() if c.compiled]
    for c in chosen:
        c.twin = copy.deepcopy(c.strategy)
    for c in chosen:
        if isinstance(c.strategy, CheckpointStrategy):
            compile_pieces((f"unit {i + 1}", u) for i, u in enumerate(c.strategy.units))
        else:
            compile_network(c.strategy.network)


@contextlib.contextmanager
def _quiet_twins() -> Iterator[None]:
    """run.compile's uncompiled twins are deep copies made before any step, and a copied optimizer
    loses the schedule's wrapper around its step: torch then warns at the twin's first schedule
    step that ``optimizer.step()`` was overridden. The twins only feed the meters; the warning
    says nothing about the run, so it is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Seems like `optimizer.step\(\)` has been overridden")
        yield


def _first_steps(field: Field, batches: list, device: torch.device) -> None:
    """run.compile: each compiled contender's first step, where compilation happens, timed apart."""
    x, y = batches[0]
    for c in field.contenders.values():
        if not c.compiled:
            continue
        c.first_step_s = _timed(c, x, y, device) / 1000.0
        c.cuda.clear()


def _timed(c: Contender, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    """One step's milliseconds; on CUDA also its peak allocation (and peak over what was there)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    c.strategy.step(x, y, StepStats(c.strategy.network.num_modules), _no_check)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        c.cuda.append((int(peak), int(peak - base)))
    return 1000.0 * (time.perf_counter() - start)


def _no_check(module: int, loss: torch.Tensor) -> None:
    """The bench's steps check no loss."""


def _measure_memory(field: Field, batches: list, warmup: int, device: torch.device) -> None:
    """Each contender's saved and live memory on the first batch, then its warm-up steps. Greedy
    runs first (one counted step, then the warm-up), so that its peak RSS is read before any
    end-to-end step has run; end to end's RSS is the larger of the two."""
    x, y = batches[0]
    for c in field.contenders.values():
        if not c.name.startswith("ckpt"):  # checkpointing's backward is counted live only
            c.saved = measure_step(c.twin or c.strategy, x, y)
        if c.name in ("greedy", "e2e"):
            for i in range(warmup):
                _timed(c, *batches[i], device)
            c.rss = peak_rss_bytes()
    for c in field.contenders.values():
        c.live = measure_live(c.twin or c.strategy, x, y)
        if c.name not in ("greedy", "e2e"):
            for i in range(warmup):
                _timed(c, *batches[i], device)
    for c in field.contenders.values():
        c.cuda.clear()


def _time_steps(field: Field, batches: list, warmup: int, steps: int, device: torch.device, say: Callable[[str], None]) -> None:
    """``steps`` timed steps of every contender, taking turns in a rotating order (reversed every
    other step) so that none always goes first and a busy machine slows all alike."""
    order = list(field.contenders.values())
    start = time.perf_counter()
    for i in range(steps):
        x, y = batches[warmup + i]
        turn = order[i % len(order):] + order[: i % len(order)]
        for c in turn if i % 2 == 0 else turn[::-1]:
            c.times.append(_timed(c, x, y, device))
        if (i + 1) % max(1, steps // 5) == 0 or i + 1 == steps:
            say(f"  step {i + 1}/{steps} [{time.perf_counter() - start:.1f}s]")


def _count_flops(field: Field, batches: list) -> None:
    """Each contender's FLOPs per step, counted on a copy of it on the first batch. Counting runs
    after every timed step: a configuration the counter cannot follow keeps its memory and time
    figures, its FLOPs left out (0, shown as -) with one warning naming it."""
    x, y = batches[0]
    for name, c in field.contenders.items():
        try:
            c.flops = measure_flops(c.twin or c.strategy, x, y)
        except Exception as exc:  # noqa: BLE001 - whatever the counter trips on, the timings stand
            warnings.warn(f"contsup bench: the FLOPs of {name} could not be counted ({type(exc).__name__}: {first_line(exc)}); "
                          "its FLOP figures are left out", stacklevel=2)
            c.flops = 0


def _figures(c: Contender, device: torch.device, saved: list[int], with_rss: bool) -> dict:
    """One configuration's figures: saved and live peaks, step times, FLOPs and FLOP/s, RSS on
    CPU, CUDA peaks."""
    median = statistics.median(c.times)
    out = {
        "saved_peak_bytes": max(saved),
        "saved_per_backward_bytes": saved,
        "live_peak_bytes": c.live["peak"],
        "live_peak_forward_bytes": c.live["forward"],
        "live_peak_backward_bytes": c.live["backward"],
        # what the configuration keeps for backward at its worst moment: the larger of the two
        "peak_bytes": max(max(saved), c.live["peak"]),
        "step_ms_median": median,
        "step_ms": c.times,
        "flops_per_step": c.flops,
        "flops_per_s": c.flops / (median / 1000.0) if median > 0 else 0.0,
    }
    if c.first_step_s is not None:  # compilation: the first step less a typical one
        out["first_step_s"] = c.first_step_s
        out["compile_s"] = max(0.0, c.first_step_s - median / 1000.0)
    if device.type == "cpu" and with_rss and c.rss is not None:
        out["peak_rss_bytes"] = c.rss
    if c.cuda:
        out["cuda_peak_bytes"] = max(p for p, _ in c.cuda)
        out["cuda_step_peak_bytes"] = max(d for _, d in c.cuda)
    return out


def run_bench(
    recipe: Recipe,
    steps: int = 20,
    warmup: int = 3,
    baseline: Baseline = "backbone",
    device: torch.device | None = None,
    log: TextIO | None = None,
    segments: Sequence[int] | None = None,
    variants: Sequence[tuple[str, Recipe]] = (),
    recompute: bool = False,
) -> dict:
    """Measure end-to-end and greedy training of ``recipe``; returns the figures and ratios.

    ``variants``: (label, recipe) pairs of other greedy configurations of the same backbone and
    data (another context, a training method, another head, ...), each measured as the recipe's own
    greedy training is and reported beside it (``result["variants"]``).

    ``baseline = "backbone"`` trains the plain backbone end-to-end (no context, no auxiliary
    heads: what one would otherwise train); ``"recipe"`` trains the recipe's own network
    end-to-end, context adapters included. ``segments``: the checkpointing configurations (the
    plain backbone, S groups of units each); None tries :func:`default_segments`, ``[]`` none.
    ``recompute``: also the variant ``context.recompute`` (the recipe with ``context.recompute =
    true``: the same initial weights), whose figures are also ``result["greedy_recompute"]``.
    """
    log = log or sys.stderr
    device = device or resolve_device(recipe.run.device)
    say: Callable[[str], None] = lambda text: (log.write(text + "\n"), log.flush())
    total = warmup + steps + 1
    field = _field(recipe, baseline, device, total, segments, variants, recompute)
    batches = _batches(recipe, device, total)
    say(f"bench {recipe.source}: greedy {field.sizes} against end-to-end ({baseline}), {warmup} + {steps} steps each")
    rss_before = peak_rss_bytes()
    if any(c.compiled for c in field.contenders.values()):
        _first_steps(field, batches, device)
    with _quiet_twins():
        _measure_memory(field, batches, warmup, device)
    _time_steps(field, batches, warmup, steps, device, say)
    with _quiet_twins():
        _count_flops(field, batches)
    result = {
        "recipe": recipe.source,
        "backbone": recipe.backbone.use,
        "context": recipe.context.use,
        "partitioner": recipe.partitioner.use,
        "modules_k": recipe.partition.modules,
        "sizes": field.sizes,
        "batch_size": recipe.data.batch_size,
        "input_shape": field.input_shape,
        "device": str(device),
        "machine": machine(),
        "torch": torch.__version__,
        "steps": steps,
        "warmup": warmup,
        "baseline": baseline,
        "compile": recipe.run.compile,
        "compiled": [name for name, c in field.contenders.items() if c.compiled],
        "rss_before_steps_bytes": rss_before if device.type == "cpu" else None,
    }
    return {**result, **_summary(recipe, field, device)}


def _summary(recipe: Recipe, field: Field, device: torch.device) -> dict:
    """The figures of every configuration and their ratios to end to end."""
    c = field.contenders
    fake = FakeTensorMode(allow_non_fake_inputs=True)  # counted from shapes, as contsup plan does: no arithmetic
    parts, shapes, info = recipe_parts(recipe, fake)
    predicted = CostModel(recipe, parts, shapes, info, fake_mode=fake).plan_costs(field.sizes)
    g = _figures(c["greedy"], device, c["greedy"].saved, True)
    e = _figures(c["e2e"], device, c["e2e"].saved, True)
    e["efficiency"] = 1.0
    g["efficiency"] = _efficiency(g, e)
    g["predicted_peak_bytes"] = max(m.bytes for m in predicted)
    g["predicted_per_module_bytes"] = [m.bytes for m in predicted]
    ratios = {
        "saved_memory": g["saved_peak_bytes"] / e["saved_peak_bytes"],
        "step_time": g["step_ms_median"] / e["step_ms_median"],
        "measured_over_predicted": g["saved_peak_bytes"] / g["predicted_peak_bytes"],
        "flops": g["flops_per_step"] / e["flops_per_step"] if e["flops_per_step"] else 0.0,
        "efficiency": g["efficiency"],
    }
    checkpointing = []
    for s in field.segments:
        ckpt = c[f"ckpt{s}"]
        f = _figures(ckpt, device, [ckpt.live["forward"]], False)
        f.update(segments=s, segment_sizes=ckpt.strategy.sizes)
        checkpointing.append(_against(f, e))
    measured_variants = []
    for label, variant in field.variants:
        v = c[f"variant:{label}"]
        f = _figures(v, device, v.saved, False)
        f.update(label=label, context=variant.context.use, method=method_summary(variant),
                 head=getattr(variant.objective.options, "head", None), sizes=field.variant_sizes[label],
                 recompute=variant.context_options.recompute)
        if variant.method is not None:  # the method's own value under its name (a link's length, say)
            f[variant.method.use] = f["method"][variant.method.use]
        measured_variants.append(_against(f, e))
    extra = {}
    if any(label == RECOMPUTE for label, _ in field.variants):  # under the names the targets read
        extra["greedy_recompute"] = rc = measured_variants[-1]
        ratios["greedy_recompute_memory"] = rc["memory_ratio"]
        ratios["greedy_recompute_step_time"] = rc["step_time_ratio"]
        ratios["greedy_recompute_over_greedy_step_time"] = rc["step_ms_median"] / g["step_ms_median"]
        ratios["greedy_recompute_efficiency"] = rc["efficiency"]
    k = recipe.partition.modules
    at_k = next((f for f in checkpointing if f["segments"] == k), None)
    best = min(checkpointing, key=lambda f: (f["peak_bytes"], f["step_ms_median"])) if checkpointing else None
    ratios["memory"] = g["peak_bytes"] / e["peak_bytes"]
    if at_k:
        ratios["checkpointing_k_memory"] = at_k["memory_ratio"]
        ratios["checkpointing_k_step_time"] = at_k["step_time_ratio"]
    if best:
        ratios["checkpointing_best_memory"] = best["memory_ratio"]
        ratios["checkpointing_best_step_time"] = best["step_time_ratio"]
    if "cuda_step_peak_bytes" in g:
        ratios["cuda_memory"] = g["cuda_step_peak_bytes"] / e["cuda_step_peak_bytes"]
    return {
        "greedy": g, "e2e": e, **extra, "checkpointing": checkpointing,
        "checkpointing_best_segments": best["segments"] if best else None, "variants": measured_variants, "ratios": ratios,
    }


def _against(f: dict, e: dict) -> dict:
    """``f`` with its memory and step time as ratios to end to end's ``e``."""
    f["memory_ratio"] = f["peak_bytes"] / e["peak_bytes"]
    f["step_time_ratio"] = f["step_ms_median"] / e["step_ms_median"]
    f["flops_ratio"] = f["flops_per_step"] / e["flops_per_step"] if e["flops_per_step"] else 0.0
    f["efficiency"] = _efficiency(f, e)
    return f


def _efficiency(f: dict, e: dict) -> float:
    """``f``'s achieved FLOP/s over end to end's ``e`` (0 where end to end counted none)."""
    return f["flops_per_s"] / e["flops_per_s"] if e["flops_per_s"] else 0.0


def greedy_strategy(recipe: Recipe, network: Any, total: int) -> GreedyStrategy:
    """The recipe's greedy training of ``network`` over ``total`` steps, with its training method."""
    method = training_method(recipe)
    return GreedyStrategy(network, recipe.optimizer.create(), recipe.schedule.create(), total, total, method=method)


def method_summary(recipe: Recipe) -> dict | None:
    """``{name: what the method says of itself}`` for the recipe's training method, or None."""
    chosen = recipe.method
    if chosen is None:
        return None
    method = chosen.create()
    return {chosen.use: method.describe() if hasattr(method, "describe") else True}

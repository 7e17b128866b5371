"""``contsup bench``: end-to-end against the recipe's greedy training, in one process, alternating.

Beside the two, end-to-end under activation checkpointing (``torch.utils.checkpoint`` over S
contiguous groups of the backbone's units: S = K and a few more, the best one reported), what a
user who only wants memory would pick instead; its memory is the live peak of the saved tensors
over the whole step, recomputation in backward included (:func:`measure_live`).

All train from the same initial backbone weights on the same batches. Memory: the saved-tensor
bytes alive for the largest backward pass (exact and deterministic on any device; the main
figure on CPU), the process's peak resident set size on CPU and the peak CUDA allocation on a
GPU. Time: the median step over N steps after a warm-up, the two strategies alternating (and
swapping which goes first) so that a busy machine slows both alike.
"""

from __future__ import annotations

import math
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Literal, Sequence, TextIO

import attrs
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from contsup.model.build import recipe_parts
from contsup.model.costs import CostModel
from contsup.training.measure import measure_live, measure_step
from contsup.training.device import resolve_device, seed_everything
from contsup.training.loaders import make_loaders
from contsup.training.strategies import CheckpointStrategy, EndToEndStrategy, GreedyStrategy, StepStats
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
    data (another context, BackLink, AugLocal heads, ...), each measured as the recipe's own
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
    seed_everything(recipe.run.seed)
    built = build_network(recipe)
    sizes = [p.units for p in built.plans]
    n = len(built.unit_shapes)
    if baseline == "backbone":
        seed_everything(recipe.run.seed)  # the backbone is built first: the same initial weights
        plain = attrs.evolve(recipe, partition=attrs.evolve(recipe.partition, modules=1))
        e2e_net = build_network(plain, costs=Costs.uniform(n)).network
    elif baseline == "recipe":
        import copy

        e2e_net = copy.deepcopy(built.network)
    else:
        raise ValueError(f"baseline must be 'backbone' or 'recipe', got {baseline!r}")
    seed_everything(recipe.run.seed)
    plain = attrs.evolve(recipe, partition=attrs.evolve(recipe.partition, modules=1))
    ckpt_net = build_network(plain, costs=Costs.uniform(n)).network.to(device).train()
    segments = default_segments(n, recipe.partition.modules) if segments is None else sorted(set(segments))
    greedy_net = built.network.to(device).train()
    if recompute:
        again = attrs.evolve(recipe, context_options=attrs.evolve(recipe.context_options, recompute=True))
        variants = [*variants, (RECOMPUTE, again)]
    e2e_net = e2e_net.to(device).train()
    total = warmup + steps + 1
    optimizer, schedule = recipe.optimizer.create(), recipe.schedule.create()
    greedy = greedy_strategy(recipe, greedy_net, total)
    others: dict[str, Any] = {}
    variant_sizes: dict[str, list[int]] = {}
    for label, variant in variants:
        seed_everything(variant.run.seed)
        vbuilt = build_network(variant)
        variant_sizes[label] = [p.units for p in vbuilt.plans]
        others[f"variant:{label}"] = greedy_strategy(variant, vbuilt.network.to(device).train(), total)
    e2e = EndToEndStrategy(e2e_net, optimizer, schedule, total, total)
    ckpts = {f"ckpt{s}": CheckpointStrategy(ckpt_net, optimizer, schedule, total, total, s) for s in segments}
    batches = _batches(recipe, device, total)
    noop = lambda module, loss: None  # noqa: E731

    say(f"bench {recipe.source}: greedy {sizes} against end-to-end ({baseline}), {warmup} + {steps} steps each")
    x, y = batches[0]
    rss_before = peak_rss_bytes()

    cuda: dict[str, list[tuple[int, int]]] = {"greedy": [], "e2e": [], **{name: [] for name in [*ckpts, *others]}}

    def timed(name: str, strategy: Any, x: torch.Tensor, y: torch.Tensor) -> float:
        """One step's milliseconds; on CUDA also its peak allocation (and peak over what was there)."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        strategy.step(x, y, StepStats(strategy.network.num_modules), noop)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            cuda[name].append((int(peak), int(peak - base)))
        return 1000.0 * (time.perf_counter() - start)

    # greedy first (one counted step, then the warm-up), so that its peak RSS is read before any
    # end-to-end step has run
    greedy_saved = measure_step(greedy, x, y)
    for i in range(warmup):
        timed("greedy", greedy, *batches[i])
    rss_greedy = peak_rss_bytes()
    e2e_saved = measure_step(e2e, x, y)
    for i in range(warmup):
        timed("e2e", e2e, *batches[i])
    rss_both = peak_rss_bytes()
    live = {"greedy": measure_live(greedy, x, y), "e2e": measure_live(e2e, x, y)}
    for name, strategy in ckpts.items():
        live[name] = measure_live(strategy, x, y)
        for i in range(warmup):
            timed(name, strategy, *batches[i])
    others_saved = {}
    for name, strategy in others.items():
        others_saved[name] = measure_step(strategy, x, y)
        live[name] = measure_live(strategy, x, y)
        for i in range(warmup):
            timed(name, strategy, *batches[i])
    for name in cuda:
        cuda[name].clear()
    times: dict[str, list[float]] = {name: [] for name in cuda}
    start = time.perf_counter()
    order = [("greedy", greedy), ("e2e", e2e), *ckpts.items(), *others.items()]
    for i in range(steps):
        x, y = batches[warmup + i]
        turn = order[i % len(order) :] + order[: i % len(order)]  # rotating, so none always goes first
        for name, strategy in turn if i % 2 == 0 else turn[::-1]:
            times[name].append(timed(name, strategy, x, y))
        if (i + 1) % max(1, steps // 5) == 0 or i + 1 == steps:
            say(f"  step {i + 1}/{steps} [{time.perf_counter() - start:.1f}s]")

    def side(name: str, saved: list[int], rss: int | None) -> dict:
        out = {
            "saved_peak_bytes": max(saved),
            "saved_per_backward_bytes": saved,
            "live_peak_bytes": live[name]["peak"],
            "live_peak_forward_bytes": live[name]["forward"],
            "live_peak_backward_bytes": live[name]["backward"],
            # what the configuration keeps for backward at its worst moment: the larger of the two
            "peak_bytes": max(max(saved), live[name]["peak"]),
            "step_ms_median": statistics.median(times[name]),
            "step_ms": times[name],
        }
        if device.type == "cpu" and rss is not None:
            out["peak_rss_bytes"] = rss
        if cuda[name]:
            out["cuda_peak_bytes"] = max(p for p, _ in cuda[name])
            out["cuda_step_peak_bytes"] = max(d for _, d in cuda[name])
        return out

    fake = FakeTensorMode(allow_non_fake_inputs=True)  # counted from shapes, as contsup plan does: no arithmetic
    parts, shapes, info = recipe_parts(recipe, fake)
    predicted = CostModel(recipe, parts, shapes, info, fake_mode=fake).plan_costs(sizes)
    g = side("greedy", greedy_saved, rss_greedy)
    e = side("e2e", e2e_saved, rss_both)
    g["predicted_peak_bytes"] = max(c.bytes for c in predicted)
    g["predicted_per_module_bytes"] = [c.bytes for c in predicted]
    ratios = {
        "saved_memory": g["saved_peak_bytes"] / e["saved_peak_bytes"],
        "step_time": g["step_ms_median"] / e["step_ms_median"],
        "measured_over_predicted": g["saved_peak_bytes"] / g["predicted_peak_bytes"],
    }
    checkpointing = []
    for s in segments:
        name = f"ckpt{s}"
        c = side(name, [live[name]["forward"]], None)
        c["segments"] = s
        c["segment_sizes"] = ckpts[name].sizes
        c["memory_ratio"] = c["peak_bytes"] / e["peak_bytes"]
        c["step_time_ratio"] = c["step_ms_median"] / e["step_ms_median"]
        checkpointing.append(c)
    measured_variants = []
    for label, variant in variants:
        name = f"variant:{label}"
        v = side(name, others_saved[name], None)
        v.update(label=label, context=variant.context.use, backlink=variant.backlink.units,
                 head=getattr(variant.objective.options, "head", None), sizes=variant_sizes[label],
                 recompute=variant.context_options.recompute)
        v["memory_ratio"] = v["peak_bytes"] / e["peak_bytes"]
        v["step_time_ratio"] = v["step_ms_median"] / e["step_ms_median"]
        measured_variants.append(v)
    extra = {}
    if recompute:  # the recompute variant's figures, under the names the targets read
        extra["greedy_recompute"] = rc = measured_variants[-1]
        ratios["greedy_recompute_memory"] = rc["memory_ratio"]
        ratios["greedy_recompute_step_time"] = rc["step_time_ratio"]
        ratios["greedy_recompute_over_greedy_step_time"] = rc["step_ms_median"] / g["step_ms_median"]
    k = recipe.partition.modules
    at_k = next((c for c in checkpointing if c["segments"] == k), None)
    best = min(checkpointing, key=lambda c: (c["peak_bytes"], c["step_ms_median"])) if checkpointing else None
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
        "recipe": recipe.source,
        "backbone": recipe.backbone.use,
        "context": recipe.context.use,
        "partitioner": recipe.partitioner.use,
        "modules_k": recipe.partition.modules,
        "sizes": sizes,
        "batch_size": recipe.data.batch_size,
        "input_shape": list(built.info.input_shape),
        "device": str(device),
        "machine": machine(),
        "torch": torch.__version__,
        "steps": steps,
        "warmup": warmup,
        "baseline": baseline,
        "rss_before_steps_bytes": rss_before if device.type == "cpu" else None,
        "greedy": g,
        "e2e": e,
        **extra,
        "checkpointing": checkpointing,
        "checkpointing_best_segments": best["segments"] if best else None,
        "variants": measured_variants,
        "ratios": ratios,
    }


def greedy_strategy(recipe: Recipe, network: Any, total: int) -> GreedyStrategy:
    """The recipe's greedy training of ``network`` over ``total`` steps, BackLink included."""
    link = recipe.backlink.units if recipe.run.mode == "greedy" else 0
    return GreedyStrategy(network, recipe.optimizer.create(), recipe.schedule.create(), total, total, backlink=link)

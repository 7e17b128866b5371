"""Where a greedy step's time goes, by operator, for configurations of one recipe: what the
context adapters add over DGL (no context), measured with torch.profiler in one process.

    OMP_NUM_THREADS=1 python benchmarks/adapter_ops.py [--recipe R] [--steps N] [--top N]

Each configuration is ``LABEL=KEY=VALUE,KEY=VALUE`` (``--config``, repeatable; default: DGL, the
fast encoder, the fast encoder with recompute). Prints, per configuration, the profiled time per
step and the operators taking most of it, each with its difference from the first configuration.
A configuration with ``run.compile=true`` is profiled compiled (after its compiling step); the
generated kernels of all its graphs show as one line:

    OMP_NUM_THREADS=1 python benchmarks/adapter_ops.py --config eager=run.compile=false --config compiled=run.compile=true
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch.profiler import profile

from contsup.api import load_recipe
from contsup.model.network import build_network
from contsup.training.compiling import compile_network
from contsup.training.strategies import GreedyStrategy, StepStats

DEFAULT = (
    "DGL=context.use=none",
    "fast encoder=context.encoder=fast",
    "fast encoder + recompute=context.encoder=fast,context.recompute=true",
)


COMPILED = "compiled kernels (torch.compile)"


def op_times(recipe_path: str, overrides: list[str], steps: int, batch: int) -> Counter:
    """Self CPU milliseconds per step of each operator over ``steps`` profiled greedy steps."""
    recipe = load_recipe(recipe_path, overrides)
    torch.manual_seed(0)
    built = build_network(recipe)
    network = built.network.train()
    strategy = GreedyStrategy(network, recipe.optimizer.create(), recipe.schedule.create(), 10, 10)
    x = torch.randn(batch, *built.info.input_shape)
    y = torch.randint(0, built.info.num_classes, (batch,))
    step = lambda: strategy.step(x, y, StepStats(network.num_modules), lambda module, loss: None)  # noqa: E731
    if recipe.run.compile:  # run.compile=true: the pieces compiled as training compiles them
        compile_network(network)
    step()  # warm-up (and compilation)
    with profile() as prof:
        for _ in range(steps):
            step()
    times: Counter = Counter()
    for e in prof.key_averages():  # torch.compile's generated kernels, one key per graph, as one line
        times[COMPILED if e.key.startswith("## Call CompiledFxGraph") else e.key] += e.self_cpu_time_total / 1e3 / steps
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="benchmarks/resnet32_k16.toml")
    parser.add_argument("--config", action="append", help="LABEL=KEY=VALUE[,KEY=VALUE...] (repeatable)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args(argv)
    configs = [c.split("=", 1) for c in (args.config or DEFAULT)]
    if any(len(c) != 2 or not c[0] for c in configs):
        parser.error("--config takes LABEL=KEY=VALUE[,KEY=VALUE...] (LABEL= alone: the recipe as it is)")
    base = None
    for label, sets in configs:
        times = op_times(args.recipe, [s for s in sets.split(",") if s], args.steps, args.batch)
        total = sum(times.values())
        if base is None:
            base, base_total = times, total
        print(f"{label}: {total:.0f} ms per step ({total - base_total:+.0f} against {configs[0][0]})")
        for name, ms in times.most_common(args.top):
            print(f"  {name[:44]:44s} {ms:7.1f} ms ({ms - base.get(name, 0.0):+7.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""run.compile's speed: compiled against uncompiled training steps in one process, alternating,
greedy R1E and end to end on the tests' small recipe (synthetic 3x16x16 images).

    OMP_NUM_THREADS=1 python benchmarks/compile_step.py BACKBONE K BATCH STEPS
    OMP_NUM_THREADS=1 python benchmarks/compile_step.py cifar_resnet20 2 32 5

Prints each configuration's first step (compilation included) and its median step after it.
"""
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins"), str(ROOT / "tests")]
from conftest import small_recipe_text
from contsup.config.recipe import loads_recipe
from contsup.core.plugins import get_plugin_manager
from contsup.core.registry import Registries
from contsup.model.network import build_network
from contsup.training.compiling import compile_network
from contsup.training.strategies import EndToEndStrategy, GreedyStrategy, StepStats
backbone, k, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
reg = Registries.from_plugin_manager(get_plugin_manager(entry_points=False))
def strategies(k_, cls):
    r = loads_recipe(small_recipe_text(modules=k_, context="R1E" if k_ > 1 else "none", batch_size=batch, train_size=batch, backbone=backbone), reg, source="m.toml")
    torch.manual_seed(0); net = build_network(r).network.train(); twin = copy.deepcopy(net); compile_network(twin)
    return [cls(n, r.optimizer.create(), r.schedule.create(), 100, 100) for n in (net, twin)]
s = dict(zip(("e2e", "e2e compiled"), strategies(1, EndToEndStrategy)))
s.update(zip(("greedy", "greedy compiled"), strategies(k, GreedyStrategy)))
g = torch.Generator().manual_seed(1)
x = torch.randn(batch, 3, 16, 16, generator=g); y = torch.randint(0, 10, (batch,), generator=g)
first = {}
for name, st in s.items():
    t = time.perf_counter(); st.step(x, y, StepStats(st.network.num_modules), lambda m, l: None); first[name] = time.perf_counter() - t
times = {n: [] for n in s}
for i in range(steps):
    for name in (list(s) if i % 2 == 0 else list(s)[::-1]):
        st = s[name]; t = time.perf_counter(); st.step(x, y, StepStats(st.network.num_modules), lambda m, l: None); times[name].append(1000 * (time.perf_counter() - t))
med = {n: statistics.median(v) for n, v in times.items()}
print(f"{backbone} 3x16x16 batch {batch} K={k} R1E, threads {torch.get_num_threads()}, median of {steps}")
for n in s:
    print(f"  {n}: first step {first[n]:.1f} s, median {med[n]:.1f} ms")
print(f"  greedy uncompiled/compiled {med['greedy'] / med['greedy compiled']:.3f}x; e2e {med['e2e'] / med['e2e compiled']:.3f}x; "
      f"greedy/e2e uncompiled {med['greedy'] / med['e2e']:.3f}, compiled {med['greedy compiled'] / med['e2e compiled']:.3f}")

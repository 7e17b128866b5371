"""The official ContSup code against contsup in one process: ResNet-32 K=16 R1E, batch 128, 3x32x32.

    git clone https://github.com/Tab-ct/ContSup /tmp/official-contsup
    OMP_NUM_THREADS=1 python benchmarks/official_code.py /tmp/official-contsup --json bench/official_code.json

The official code is imported from the given checkout (it is not part of contsup). Its training
forward runs the whole greedy step (every module's forward, local loss and backward); one SGD
step follows. Beside it, contsup's greedy step of benchmarks/resnet32_k16.toml and end-to-end
training of the plain backbone, in rotating order, on the same random batch, one torch thread.
Memory: the live saved-tensor peak of one step (contsup.training.measure), the same meter for all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import attrs
import torch

from contsup.config.recipe import load_recipe
from contsup.model.saved import module_tensors
from contsup.model.network import build_network
from contsup.tools.bench import machine
from contsup.training.measure import LiveMemory, measure_live
from contsup.training.strategies import EndToEndStrategy, GreedyStrategy, StepStats
from contsup.types import Costs

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "benchmarks" / "resnet32_k16.toml"


def official_step(checkout: Path, x: torch.Tensor, y: torch.Tensor):
    """A function running one training step of the official code's ResNet-32 K=16 R1E, and its model."""
    torch.Tensor.cuda = lambda self, *a, **k: self  # the official code moves two constants to CUDA
    sys.path.insert(0, str(checkout))
    import networks_dev.resnet as resnet  # noqa: E402 (from the checkout)
    from networks_dev.configs import local_loss_scale  # noqa: E402

    model = resnet.resnet32(
        local_module_num=16, batch_size=len(x), image_size=x.shape[-1], dataset="cifar10", class_num=10,
        local_loss_mode="cross_entropy", aux_net_config="1c2f", aux_net_widen=1, aux_net_feature_dim=128,
        context_mode="R1E",
    ).train()
    a, b, c, d = local_loss_scale["resnet32"]["cifar10"][16]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad()
        model(img=x, target=y, ixx_1=a, ixy_1=b, ixx_2=c, ixy_2=d)
        optimizer.step()

    return step, model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a checkout of the official ContSup code")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, each configuration once per round")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    step, model = official_step(args.checkout, x, y)
    recipe = load_recipe(RECIPE)
    network = build_network(recipe).network.train()
    plain = attrs.evolve(recipe, partition=attrs.evolve(recipe.partition, modules=1))
    backbone = build_network(plain, costs=Costs.uniform(len(network.blocks))).network.train()
    greedy = GreedyStrategy(network, recipe.optimizer.create(), recipe.schedule.create(), 100, 100)
    e2e = EndToEndStrategy(backbone, recipe.optimizer.create(), recipe.schedule.create(), 100, 100)
    noop = lambda module, loss: None  # noqa: E731
    runs = {
        "official code R1E": step,
        "contsup R1E": lambda: greedy.step(x, y, StepStats(network.num_modules), noop),
        "contsup end-to-end": lambda: e2e.step(x, y, StepStats(1), noop),
    }
    meter = LiveMemory(module_tensors(model))
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        step()
    peaks = {"official code R1E": meter.peak, "contsup R1E": measure_live(greedy, x, y)["peak"],
             "contsup end-to-end": measure_live(e2e, x, y)["peak"]}
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(1000.0 * (time.perf_counter() - start))
    e = statistics.median(times["contsup end-to-end"])
    rows = {name: {"peak_bytes": peaks[name], "step_ms_median": statistics.median(times[name]),
                   "step_time_ratio": statistics.median(times[name]) / e, "step_ms": times[name]} for name in names}
    print("| configuration | peak kept for backward (MiB) | median step (ms) | step / end-to-end |")
    print("| --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['peak_bytes'] / 2**20:.1f} | {r['step_ms_median']:.0f} | {r['step_time_ratio']:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "rounds": args.rounds, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

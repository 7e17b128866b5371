"""The official M_E with the channels-last gradient into its pool against the plain .contiguous().

    OMP_NUM_THREADS=1 python benchmarks/encoder_gradient_layout.py            # M_E alone, three widths
    OMP_NUM_THREADS=1 python benchmarks/encoder_gradient_layout.py --step     # and a whole greedy step

Both sides in one process, alternating (which goes first swaps every pair); each figure is the
median of the per-pair ratios new / old. Before timing, both give bit-equal outputs and gradients
(the step: bit-equal weights and statistics after one step from the same state).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

import contsup.adapters as adapters
from contsup.adapters import InputEncoder
from contsup.config.recipe import load_recipe
from contsup.model.network import build_network
from contsup.training.strategies import GreedyStrategy, StepStats

RECIPE = Path(__file__).resolve().parent / "resnet32_k16.toml"
NEW = adapters._BackToContiguous


class Plain:
    """The end of M_E as it was: a plain .contiguous(), whose gradient goes back contiguous."""

    @staticmethod
    def apply(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()


def paired(run: Callable[[str], None], pairs: int) -> float:
    """The median over ``pairs`` of time(new) / time(old), alternating which runs first."""
    ratios = []
    for i in range(pairs):
        t = {}
        for side in ("old", "new") if i % 2 else ("new", "old"):
            start = time.perf_counter()
            run(side)
            t[side] = time.perf_counter() - start
        ratios.append(t["new"] / t["old"])
    return statistics.median(ratios)


def use(side: str) -> None:
    adapters._BackToContiguous = NEW if side == "new" else Plain


def encoder_alone(pairs: int) -> None:
    x = torch.randn(128, 3, 32, 32)
    for c, s in ((16, 32), (32, 16), (64, 8)):
        torch.manual_seed(0)
        m = InputEncoder((3, 32, 32), (c, s, s), hidden=12).train()
        g = torch.linspace(-1, 1, 128 * c * s * s).view(128, c, s, s)
        seen = []
        for side in ("old", "new"):
            use(side)
            m.zero_grad(set_to_none=True)
            out = m(x)
            out.backward(g)
            seen.append([out.detach(), *(p.grad.clone() for p in m.parameters())])
        equal = all(torch.equal(a, b) for a, b in zip(*seen))

        def run(side: str) -> None:
            use(side)
            m(x).backward(g)

        print(f"M_E 3->12->{c} at 32x32, pooled to {s}x{s}: bit-equal {equal}; new / old {paired(run, pairs):.3f}")


def greedy_step(pairs: int) -> None:
    recipe = load_recipe(RECIPE)
    torch.manual_seed(0)
    network = build_network(recipe).network.train()
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    noop = lambda module, loss: None  # noqa: E731

    def strategy(net: torch.nn.Module) -> GreedyStrategy:
        return GreedyStrategy(net, recipe.optimizer.create(), recipe.schedule.create(), 100, 100)

    states = []
    for side in ("old", "new"):
        use(side)
        net = copy.deepcopy(network)
        strategy(net).step(x, y, StepStats(net.num_modules), noop)
        states.append(net.state_dict())
    equal = all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    sides = {side: strategy(copy.deepcopy(network)) for side in ("old", "new")}

    def run(side: str) -> None:
        use(side)
        sides[side].step(x, y, StepStats(network.num_modules), noop)

    print(f"greedy step of {RECIPE.name}: bit-equal after one step {equal}; new / old {paired(run, pairs):.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=9, help="alternating pairs per figure (default 9)")
    parser.add_argument("--step", action="store_true", help="also a whole greedy step of benchmarks/resnet32_k16.toml")
    args = parser.parse_args()
    torch.set_num_threads(1)
    encoder_alone(args.pairs)
    if args.step:
        greedy_step(max(2, args.pairs // 2))
    use("new")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Which modules each pipeline rank owns: the grid of stages x replicas, the stage plan (given, or
balanced by measured time per micro-batch) and what crosses each stage boundary."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import attrs
import torch

from contsup.training.processes import Setup
from contsup.training.precision import to_memory_format
from contsup.training.strategies import StepStats, make_strategy


@attrs.frozen
class Grid:
    """``stages`` x ``replicas`` ranks. Replica r is a whole pipeline on consecutive ranks, so
    rank = replica * stages + stage and the next stage of a rank is the next rank."""

    stages: int
    replicas: int = 1

    def place(self, rank: int) -> tuple[int, int]:
        """(replica, stage) of ``rank``."""
        return divmod(rank, self.stages)

    def column(self, stage: int) -> list[int]:
        """The ranks holding ``stage``, one per replica (replica 0's first)."""
        return [r * self.stages + stage for r in range(self.replicas)]


@attrs.frozen
class StagePlan:
    """Modules per stage (``sizes``; a stage is a rank without replicas) and, when balanced
    automatically, each module's measured seconds per micro-batch (``costs``)."""

    sizes: tuple[int, ...]
    costs: tuple[float, ...] | None = None

    def modules(self, rank: int) -> tuple[int, int]:
        """(first, last) module, 1-based, of ``rank``."""
        first = sum(self.sizes[:rank]) + 1
        return first, first + self.sizes[rank] - 1

    def owner(self, module: int) -> int:
        for rank in range(len(self.sizes)):
            first, last = self.modules(rank)
            if first <= module <= last:
                return rank
        raise ValueError(f"no rank owns module {module}")

    def describe(self, replicas: int = 1) -> str:
        grid = Grid(len(self.sizes), replicas)
        parts = []
        for stage in range(grid.stages):
            first, last = self.modules(stage)
            span = f"module {first}" if first == last else f"modules {first}-{last}"
            if self.costs is not None:
                ms = 1000 * sum(self.costs[first - 1 : last])
                span += f" ({ms:.1f} ms)"
            ranks = grid.column(stage)
            where = f"rank {stage}" if replicas == 1 else f"stage {stage} (ranks {', '.join(map(str, ranks))})"
            parts.append(f"{where}: {span}")
        how = "balanced by measured time per micro-batch" if self.costs is not None else "as distributed.stages says"
        shape = f"{grid.stages} stages" + (f" x {replicas} replicas" if replicas > 1 else "")
        return f"pipeline of {shape}, {how}: " + "; ".join(parts)


@attrs.frozen
class Crossing:
    """What the rank whose last module is ``after`` sends on: h, y, then x if a later module needs
    it, then the h_j^c (``features``, by j) that later modules take as context."""

    after: int
    needs_x: bool
    features: tuple[int, ...]

    @property
    def count(self) -> int:
        return 2 + int(self.needs_x) + len(self.features)


def needs_input(module: Any) -> bool:
    """Whether module l uses x: as a context source (E) or as a reconstruction target."""
    uses_decoder = module.decoder is not None and module.weights[0] != 0.0
    return uses_decoder or any(s.is_input for s in module.sources)


def crossing(network: Any, after: int) -> Crossing:
    """What crosses the boundary after module ``after`` (1-based) of ``network``."""
    later = [m for m in network.blocks if m.index > after]
    features = sorted({s.index for m in later for s in m.sources if not s.is_input and s.index + 1 <= after})
    return Crossing(after, any(needs_input(m) for m in later), tuple(features))


def measure_module_costs(setup: Setup, batch: int, repeats: int = 3) -> tuple[float, ...]:
    """Seconds one greedy step of each module takes on a micro-batch of ``batch`` random images
    (the median of ``repeats`` after one warm-up), on a copy of the network and its strategy."""
    network = copy.deepcopy(setup.network).train()
    strategy = make_strategy(setup.recipe, network, setup.steps_per_epoch, setup.precision)
    info, device = setup.built.info, setup.device
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *info.input_shape), generator=g).to(device)
    y = torch.randint(0, info.num_classes, (batch,), generator=g).to(device)
    x = to_memory_format(x, setup.channels_last)
    stats = StepStats(network.num_modules)
    times: list[list[float]] = [[] for _ in network.blocks]
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for rep in range(repeats + 1):
            store = network.store(x, detach=True)
            h = x
            for m in network.blocks:
                start = time.perf_counter()
                h = strategy.train_module(m, h, store, x, y, stats, lambda module, loss: None)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if rep:
                    times[m.index - 1].append(time.perf_counter() - start)
    return tuple(statistics.median(t) for t in times)


__all__ = ["Grid", "StagePlan", "Crossing", "crossing", "needs_input", "measure_module_costs"]

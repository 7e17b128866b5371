"""Inference cost of context supply: the time of one pass over the test set through the network
with its context adapters and through the same network with them skipped (the bare backbone),
as in the paper's Table 10.

Both passes run the same modules and head on the same preloaded batches (data loading is not
timed); they alternate, after warm-up, and the median of the repeats is reported. Timing does
not depend on the weights, so a freshly built network from a recipe measures the same as the
trained one of a run directory.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import attrs
import torch
from torch import nn

from contsup.errors import ContsupError
from contsup.training.device import resolve_device, seed_everything
from contsup.model.network import build_network
from contsup.config.recipe import load_recipe
from contsup.training.rundir import RECIPE_FILE, atomic_write, load_model


def bare_forward(network: Any, x: torch.Tensor) -> torch.Tensor:
    """The network without context: x: (B, C, H, W) -> logits, every adapter and store skipped."""
    h = x
    for m in network.blocks:
        h = m.body(h)
    return network.blocks[-1].head(h)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pass(forward: Callable[[torch.Tensor], torch.Tensor], batches: Sequence[torch.Tensor], device: torch.device) -> float:
    """Seconds for ``forward`` over every batch (device synchronised before and after)."""
    _sync(device)
    start = time.perf_counter()
    for x in batches:
        forward(x)
    _sync(device)
    return time.perf_counter() - start


def count_macs(network: Any, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    """Multiply-accumulates of the convolutions and linear layers ``forward`` runs on x: (B, C, H, W),
    per image: the device-independent side of the timing."""
    total = 0

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.modules.conv._ConvNd):
            per_output = module.weight.shape[1] * math.prod(module.weight.shape[2:])
        else:
            per_output = module.weight.shape[1]
        total += output.numel() * per_output

    handles = [m.register_forward_hook(hook) for m in network.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with torch.inference_mode():
            forward(x)
    finally:
        for h in handles:
            h.remove()
    return total // len(x)


@attrs.frozen
class InferenceCost:
    """Median seconds per pass over the test set with and without context, and each repeat."""

    with_context_s: float
    without_context_s: float
    with_context_runs: tuple[float, ...]
    without_context_runs: tuple[float, ...]
    images: int
    batches: int
    adapters: int
    adapter_params: int
    device: str
    with_context_macs: int
    without_context_macs: int

    @property
    def ratio(self) -> float:
        """Time with context over time without (1.05 = 5 % slower)."""
        return self.with_context_s / self.without_context_s

    @property
    def overhead_pct(self) -> float:
        return 100.0 * (self.ratio - 1.0)

    @property
    def paired_ratio(self) -> float:
        """The median of each repeat's own ratio: robust to the machine's load drifting."""
        return statistics.median(a / b for a, b in zip(self.with_context_runs, self.without_context_runs))

    @property
    def macs_ratio(self) -> float:
        return self.with_context_macs / self.without_context_macs

    def as_dict(self) -> dict:
        return {**attrs.asdict(self), "ratio": self.ratio, "overhead_pct": self.overhead_pct,
                "paired_ratio": self.paired_ratio, "macs_ratio": self.macs_ratio}


def inference_cost(network: Any, batches: Sequence[torch.Tensor], device: torch.device, repeats: int = 5, warmup: int = 1) -> InferenceCost:
    """Time ``network(x)`` against :func:`bare_forward` over ``batches`` (already on ``device``),
    in eval mode without autograd; ``repeats`` alternating pairs after ``warmup`` pairs."""
    if repeats < 1 or warmup < 0:
        raise ContsupError(f"inference benchmark: repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    network = network.eval()
    full, bare = [], []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            # alternate which pass goes first so drift on a shared machine favours neither
            order = [("full", network), ("bare", lambda x: bare_forward(network, x))]
            if i % 2:
                order.reverse()
            for name, fn in order:
                t = time_pass(fn, batches, device)
                if i >= warmup:
                    (full if name == "full" else bare).append(t)
    adapters = [a for m in network.blocks for a in m.adapters.values()]
    sample = batches[0][:1]
    return InferenceCost(
        with_context_s=statistics.median(full),
        without_context_s=statistics.median(bare),
        with_context_runs=tuple(full),
        without_context_runs=tuple(bare),
        images=sum(len(x) for x in batches),
        batches=len(batches),
        adapters=len(adapters),
        adapter_params=sum(p.numel() for a in adapters for p in a.parameters()),
        device=str(device),
        with_context_macs=count_macs(network, network, sample),
        without_context_macs=count_macs(network, lambda x: bare_forward(network, x), sample),
    )


def load_target(target: str, overrides: Sequence[str], registries: Any) -> tuple[Any, Any, str]:
    """(network, recipe, what): a run directory's trained network, or a recipe's fresh one."""
    path = Path(target)
    if path.is_dir():
        if overrides:
            raise ContsupError(f"--set applies to a recipe, not to the run directory {target}; pass the recipe instead")
        recipe = load_recipe(path / RECIPE_FILE, (), registries)
        return load_model(path), recipe, f"the trained network of {target}"
    if not path.is_file():
        raise ContsupError(f"{target}: no such recipe file or run directory")
    recipe = load_recipe(path, overrides, registries)
    seed_everything(recipe.run.seed)
    return build_network(recipe).network, recipe, f"a freshly built network of {target}"


def bench_inference_main(
    target: str, overrides: Sequence[str], registries: Any, device: str, repeats: int, warmup: int,
    batch_size: int | None, json_path: str | None, log: TextIO | None = None,
) -> int:
    """``contsup bench --inference``: print (and optionally save as JSON) the timing and ratio."""
    import json

    from torch.utils.data import DataLoader

    log = log or sys.stdout
    if batch_size is not None and batch_size < 1:
        raise ContsupError(f"--batch-size: must be >= 1, got {batch_size}")
    network, recipe, what = load_target(target, overrides, registries)
    dev = resolve_device(device if device else recipe.run.device)
    network = network.to(dev)
    test = recipe.dataset.create().load(train=False)
    size = batch_size or recipe.data.test_batch_size or recipe.data.batch_size
    batches = [x.to(dev) for x, _ in DataLoader(test, batch_size=size, shuffle=False)]
    log.write(f"timing {what} on {dev}: {len(test)} test images in {len(batches)} batches of {size}, {warmup} warm-up + {repeats} repeats\n")
    log.flush()
    cost = inference_cost(network, batches, dev, repeats=repeats, warmup=warmup)
    k = network.num_modules
    log.write(
        f"K={k}, context {recipe.context.use}: {cost.adapters} adapters, {cost.adapter_params:,} parameters\n"
        f"  without context (backbone): {cost.without_context_s:.4f} s  (runs {', '.join(f'{t:.4f}' for t in cost.without_context_runs)})\n"
        f"  with context:               {cost.with_context_s:.4f} s  (runs {', '.join(f'{t:.4f}' for t in cost.with_context_runs)})\n"
        f"  ratio {cost.ratio:.3f} ({cost.overhead_pct:+.1f} %); median of the paired repeats' ratios {cost.paired_ratio:.3f}\n"
        f"  multiply-accumulates per image: {cost.without_context_macs / 1e6:.2f} M without, "
        f"{cost.with_context_macs / 1e6:.2f} M with context (ratio {cost.macs_ratio:.3f})\n"
    )
    if json_path:
        data = {"target": target, "context": recipe.context.use, "modules": k, "torch": torch.__version__,
                "threads": torch.get_num_threads(), **cost.as_dict()}
        atomic_write(Path(json_path), lambda f: json.dump(data, f, indent=2), binary=False)
        log.write(f"wrote {json_path}\n")
    return 0

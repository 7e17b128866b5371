"""Whether a run's first step can fit in the device's memory, estimated from shapes alone before
anything is built or written, so that a run that cannot fit is refused in one line instead of
failing an allocation minutes later (or thrashing the machine).

The estimate is the plan's own count (:mod:`contsup.model.memory`, on fake tensors: no
arithmetic, nothing allocated however large the recipe) at the recipe's batch size. For the
module that needs most it adds up: the activations it keeps for backward (its units, head,
decoder, adapters, input and the context kept for later modules); every parameter of the
network (a one-process run holds them all on its device); and that module's gradients and
optimizer state (one buffer per parameter for SGD with momentum, two for Adam-style
optimizers, none otherwise). Left out: temporaries of the forward and backward, other modules'
gradients, the data in memory and the allocator's overhead, and a piece fake tensors cannot
run (a loss that branches on the labels, such as supcon's) counts as keeping nothing, so the
figure is a lower bound and a run is refused only when even that exceeds what the machine has.
With ``context.recompute`` (``recompute_head``) the adapters' (heads') own activations are not
counted: they are made again in backward, which is what lets such a run fit.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from contsup.config.recipe import Recipe
from contsup.errors import ContsupError
from contsup.model.build import recipe_parts
from contsup.model.costs import CostModel
from contsup.model.fitting import partition_costs
from contsup.model.network import check_split

GB = 1e9
PARAM_BYTES = 4  # parameters, gradients and optimizer state stay fp32 under autocast


@attrs.frozen
class Need:
    """The first step's estimated need: ``what`` ("module 2", "end-to-end training") and its bytes."""

    what: str
    activations: int
    parameters: int
    training_state: int  # the module's gradients and optimizer state
    batch: int

    @property
    def bytes(self) -> int:
        return self.activations + self.parameters + self.training_state


def optimizer_buffers(recipe: Recipe) -> int:
    """Buffers the optimizer keeps per parameter: 1 for SGD with momentum, 2 for Adam-style, else 0."""
    name = recipe.optimizer.use.lower()
    if "adam" in name:
        return 2
    return 1 if float(getattr(recipe.optimizer.options, "momentum", 0.0) or 0.0) > 0 else 0


def estimate_need(recipe: Recipe) -> Need:
    """The largest first-step need of one process training ``recipe``, from shapes alone."""
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    parts, shapes, info = recipe_parts(recipe, fake)
    k, n = recipe.partition.modules, len(shapes)
    batch = recipe.data.batch_size
    model = CostModel(recipe, parts, shapes, info, batch_size=batch, fake_mode=fake, real_fallback=False)
    half = recipe.run.precision in ("bf16", "fp16")  # autocast keeps most activations at 2 bytes
    total_params = sum(u.params for u in model.units) + model.head(n - 1, model.components(k, k)).params
    per_param = PARAM_BYTES * (1 + optimizer_buffers(recipe))  # a gradient, and the optimizer's buffers
    if recipe.run.mode != "greedy":
        head = model.head(n - 1, model.components(k, k))
        kept = sum(model.unit_bytes(u) for u in range(n)) + head.own
        kept += model.x_bytes if "in" in model.units[0].saves else 0
        return Need("end-to-end training", kept // 2 if half else kept, PARAM_BYTES * total_params, per_param * total_params, batch)
    partitioner = recipe.partitioner.create()
    sizes = check_split(partitioner.split(partition_costs(partitioner, recipe, parts, shapes, info, fake), k), n, k, recipe.partitioner.use)
    costs = model.plan_costs(sizes)
    total_params = max(total_params, sum(c.params for c in costs))  # the aux heads and adapters too
    needs = []
    for c in costs:
        kept = forward_kept(c, recipe)
        needs.append(Need(f"module {c.index}", kept // 2 if half else kept, PARAM_BYTES * total_params, per_param * c.params, batch))
    return max(needs, key=lambda need: need.bytes)


def forward_kept(cost: Any, recipe: Recipe) -> int:
    """What module ``cost`` keeps through its forward: the plan's count (which, under
    ``context.recompute``, leaves out the adapters' own activations already), less the head's
    own when ``recompute_head`` makes them again in backward instead. Still a lower bound of the
    step's peak, which also has to hold the recomputation."""
    return cost.bytes - (cost.breakdown["head"] if recipe.context_options.recompute_head else 0)


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes, what) the device can still give: free CUDA memory, or on a CPU the available RAM
    and free swap (``/proc/meminfo``, else ``os.sysconf``); None where it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device}"
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        if "MemAvailable" in fields:
            return fields["MemAvailable"] + fields.get("SwapFree", 0), "available (RAM and free swap)"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "available (RAM)"
    except (OSError, ValueError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / GB:,.0f} GB" if n >= 10 * GB else f"{n / GB:,.1f} GB"


def refusal(need: Need, available: int, what: str, recipe: Recipe) -> str:
    """The one line that refuses a run: what needs how much, what the machine has, what to change."""
    parts = f"activations kept for backward {_gb(need.activations)}, parameters {_gb(need.parameters)}, " \
        f"gradients and optimizer state {_gb(need.training_state)}"
    if need.activations >= need.parameters + need.training_state:
        modules = "" if recipe.run.mode != "greedy" else " or raise partition.modules"
        hint = f"lower data.batch_size (or the input's size){modules}"
    else:
        hint = "the parameters alone are too many: choose a smaller backbone or fewer classes"
    return (
        f"{need.what} needs about {_gb(need.bytes)} for one batch of {need.batch} ({parts}); "
        f"this machine has {_gb(available)} {what}; {hint}"
    )


def check_fits(recipe: Recipe, device: torch.device, available: Any = None) -> Need | None:
    """Refuse (``ContsupError``, exit 2) a one-process run whose first step clearly cannot fit in
    ``device``'s memory (``available(device)``: :func:`available_memory`'s answer by default);
    returns the estimate, or None where none could be made (then the run starts as it would
    have: the estimate never stops a run it cannot judge)."""
    if recipe.distributed.mode != "none":
        return None  # each process holds a part, at its own batch: not judged here
    try:
        need = estimate_need(recipe)
    except Exception:  # noqa: BLE001 - a recipe the estimate cannot follow fails, if at all, where it would have
        return None
    have = (available or available_memory)(device)
    if have is not None and need.bytes > have[0]:
        raise ContsupError(refusal(need, have[0], have[1], recipe))
    return need


__all__ = ["Need", "estimate_need", "available_memory", "check_fits", "optimizer_buffers"]

"""``contsup profile``: measured cost per unit and per module, and how good the recipe's split is.

The lower bound of any split's peak is max(largest unit, total / K): no module is smaller than
its largest unit, and K modules cannot all be below the average.
"""

from __future__ import annotations

import torch

from contsup.model.build import recipe_parts
from contsup.model.costs import CostModel
from contsup.model.fitting import partition_costs
from contsup.training.device import resolve_device
from contsup.model.network import check_split, plan_modules
from contsup.config.recipe import Recipe


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def profile_data(recipe: Recipe, device: torch.device | None = None, repeats: int = 3) -> dict:
    """Per unit and per module: bytes kept for backward, milliseconds of forward + backward and
    their shares; the recipe's split, its predicted peak and the lower bound."""
    device = device or resolve_device(recipe.run.device)
    method = "cuda" if device.type == "cuda" else "saved"
    parts, shapes, info = recipe_parts(recipe)
    model = CostModel(recipe, parts, shapes, info, device=device, method=method, timing=True, repeats=repeats)
    k = recipe.partition.modules
    n = model.n
    partitioner = recipe.partitioner.create()
    sizes = check_split(partitioner.split(partition_costs(partitioner, recipe, parts, shapes, info), k), n, k, recipe.partitioner.use)
    plans = plan_modules(sizes, shapes, tuple(info.input_shape), [model.components(module, k).selector for module in range(1, k + 1)])
    modules = model.plan_costs(sizes)
    unit_bytes = [model.unit_bytes(u) for u in range(n)]
    unit_ms = [p.ms or 0.0 for p in model.units]
    total_bytes, total_ms = sum(unit_bytes), sum(unit_ms)
    module_bytes = sum(m.bytes for m in modules)
    module_ms = sum(m.ms or 0.0 for m in modules)
    peak = max(modules, key=lambda m: m.bytes)
    largest = max(unit_bytes)
    bound = max(largest, total_bytes / k)
    linked = [m.breakdown["link"] for m in modules]  # module l-1's linked units, kept while module l trains
    trains_with = model.training_method
    link = None if not any(linked) else {
        "method": trains_with.name,
        "describe": trains_with.label() if hasattr(trains_with, "label") else None,
        "linked_bytes": linked,  # per module l: module l-1's linked units, kept while module l trains
        "peak_bytes": peak.bytes,
    }
    return {
        "recipe": recipe.source,
        "backbone": recipe.backbone.use,
        "context": recipe.context.use,
        "partitioner": recipe.partitioner.use,
        "modules_k": k,
        "batch_size": model.batch,
        "input_shape": list(info.input_shape),
        "device": str(device),
        "method": method,
        "units": [
            {
                "index": u,
                "output_shape": list(shapes[u]),
                "bytes": unit_bytes[u],
                "ms": unit_ms[u],
                "bytes_share": _share(unit_bytes[u], total_bytes),
                "ms_share": _share(unit_ms[u], total_ms),
            }
            for u in range(n)
        ],
        "modules": [
            {
                "index": m.index,
                "units": plan.units,
                "unit_range": list(m.unit_range),
                "sources": [str(s) for s in plan.sources],
                "bytes": m.bytes,
                "ms": m.ms,
                "bytes_share": _share(m.bytes, module_bytes),
                "ms_share": _share(m.ms or 0.0, module_ms),
                "breakdown": m.breakdown,
            }
            for m, plan in zip(modules, plans)
        ],
        "total_unit_bytes": total_bytes,
        "total_unit_ms": total_ms,
        "predicted_peak_bytes": peak.bytes,
        "peak_module": peak.index,
        "largest_unit_bytes": largest,
        "lower_bound_bytes": bound,
        "peak_over_bound": peak.bytes / bound if bound else None,
        "link": link,
        **({trains_with.name: link} if link else {}),
    }


def mib(n: float) -> str:
    """Bytes as MiB with two decimals."""
    return f"{n / 2**20:.2f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def profile_text(data: dict, table) -> str:
    """The human-readable report; ``table`` renders rows (the CLI's table helper)."""
    lines = [
        f"{data['backbone']}, batch {data['batch_size']}, input {'x'.join(map(str, data['input_shape']))}, "
        f"context {data['context']}, {data['partitioner']} K={data['modules_k']}, on {data['device']} "
        f"({'saved-tensor bytes' if data['method'] == 'saved' else 'CUDA peak allocation'})",
        "",
        "per unit:",
    ]
    rows = [("unit", "output", "MiB", "% bytes", "ms", "% time")]
    for u in data["units"]:
        rows.append(
            (str(u["index"]), "x".join(map(str, u["output_shape"])), mib(u["bytes"]), _pct(u["bytes_share"]), f"{u['ms']:.1f}", _pct(u["ms_share"]))
        )
    lines += [table(rows), "", "per module (units, head, adapters, inputs and kept context):"]
    rows = [("module", "units", "sources", "MiB", "% bytes", "ms", "% time", "units MiB", "head MiB", "adapters MiB", "inputs MiB")]
    for m in data["modules"]:
        b = m["breakdown"]
        rows.append(
            (
                str(m["index"]),
                f"{m['unit_range'][0]}-{m['unit_range'][1]}",
                ", ".join(m["sources"]) or "-",
                mib(m["bytes"]),
                _pct(m["bytes_share"]),
                f"{m['ms']:.1f}",
                _pct(m["ms_share"]),
                mib(b["units"]),
                mib(b["head"]),
                mib(b["adapters"]),
                mib(b["inputs"]),
            )
        )
    lines.append(table(rows))
    lines += [
        "",
        f"predicted peak: {mib(data['predicted_peak_bytes'])} MiB (module {data['peak_module']}); "
        f"lower bound max(largest unit {mib(data['largest_unit_bytes'])}, total/K "
        f"{mib(data['total_unit_bytes'] / data['modules_k'])}) = {mib(data['lower_bound_bytes'])} MiB; "
        f"peak / bound = {data['peak_over_bound']:.2f}",
    ]
    link = data.get("link")
    if link:
        how = f" ({link['describe']})" if link["describe"] is not None else ""
        lines.append(
            f"{link['method']}{how}: each module also keeps the previous "
            f"module's linked units while it trains (up to {mib(max(link['linked_bytes']))} MiB, included in the "
            f"figures above); predicted peak with them: {mib(link['peak_bytes'])} MiB"
        )
    return "\n".join(lines)

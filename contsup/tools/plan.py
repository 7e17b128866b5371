"""``contsup plan``: a recipe's modules, their sources and adapters, parameters, shapes and the
activation memory each keeps for backward, against end-to-end training.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence

import attrs
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from contsup.config.recipe import Recipe
from contsup.model.build import recipe_parts
from contsup.model.components import training_method
from contsup.model.costs import CostModel
from contsup.model.network import build_network, count_params
from contsup.tools.tables import format_table
from contsup.types import Shape


@attrs.frozen
class ModuleMemory:
    """What training one module keeps for backward (the figure ``memory_balanced`` balances), at
    the recipe's batch, with the share of its context adapters and of its body's units; and the
    arithmetic of one image's forward through the body and through the adapters."""

    index: int
    bytes: int
    adapter_bytes: int
    body_bytes: int
    body_flops: int
    adapter_flops: int
    link_bytes: int = 0  # with a linking method: module l-1's linked units, kept while module l trains (in ``bytes``)
    head_bytes: int = 0  # what its head (auxiliary or final, and decoder) keeps (in ``bytes``)

    @property
    def adapters_dominate(self) -> bool:
        """Whether the adapters cost more memory or arithmetic than the module's body."""
        return self.adapter_bytes > self.body_bytes or self.adapter_flops > self.body_flops


@attrs.frozen
class PlanMemory:
    """Every module's :class:`ModuleMemory`; ``units_bytes`` what the whole backbone's units keep
    (what end-to-end training keeps, its head aside). Counted from shapes at the recipe's batch,
    so ``measured_batch`` is ``batch`` and the figures are the CPU's saved bytes exactly (a
    piece fake tensors cannot run is measured for real, at that batch too)."""

    modules: tuple[ModuleMemory, ...]
    units_bytes: int
    batch: int
    measured_batch: int
    notes: tuple[str, ...] = ()  # pieces measured with real arithmetic, and why (CostModel.notes)


def forward_flops(module: nn.Module, shape: Shape) -> int:
    """Floating-point operations of one image of ``shape`` through ``module`` (torch's count)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = module.training
    module.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(torch.zeros((1, *shape)))
    module.train(was_training)
    return int(counter.get_total_flops())


def link_spans(method: Any, sizes: Sequence[int]) -> list[tuple[int, int] | None]:
    """Per module l, the [first, last] units (0-based, inclusive) that module l+1's loss also
    trains through the training method's link (None where it has none)."""
    link = getattr(method, "link", None)
    out: list[tuple[int, int] | None] = []
    start = 0
    for module, n in enumerate(sizes, start=1):
        last = start + n - 1
        span = int(link(module, len(sizes), n)) if link is not None else 0
        out.append((max(start, last - span + 1), last) if span > 0 else None)
        start += n
    return out


def plan_memory(recipe: Recipe, network: nn.Module, plans: Sequence[Any], sizes: Sequence[int]) -> PlanMemory:
    """Each module's training memory for the split ``sizes`` of ``network`` (built from
    ``recipe``), as :class:`PlanMemory` says. With a training method that links modules, module
    l's figure adds what module l-1's linked units keep (their saved activations, each unit's
    output included), alive until module l's backward: an estimate from the units' own measurements."""
    batch = measured = recipe.data.batch_size
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    parts, shapes, info = recipe_parts(recipe, fake)
    model = CostModel(recipe, parts, shapes, info, device="cpu", method="shapes", batch_size=batch, fake_mode=fake)
    out = []
    for cost, plan, m in zip(model.plan_costs(sizes), plans, network.blocks):
        adapter_flops = sum(
            forward_flops(m.adapters[str(s)], info.input_shape if s.is_input else plans[s.index].input_shape)
            for s in plan.sources
        )
        out.append(ModuleMemory(
            cost.index, cost.bytes, cost.breakdown["adapters"],
            cost.breakdown["units"], forward_flops(m.body, plan.input_shape), adapter_flops, cost.breakdown["link"],
            cost.breakdown["head"],
        ))
    units = sum(model.unit_bytes(u) for u in range(model.n))
    return PlanMemory(tuple(out), units, batch, measured, tuple(model.notes))


def _params_split(m: nn.Module, has_parts: bool) -> dict[str, int]:
    """A module's parameters by part; "method" only in recipes whose method adds parts."""
    split = {
        "body": count_params(m.body),
        "head": count_params(m.head),
        "adapters": count_params(m.adapters),
        "decoder": count_params(m.decoder) if m.decoder is not None else 0,
    }
    if has_parts:
        split["method"] = count_params(m.part) if m.part is not None else 0
    return split


def plan_data(recipe: Any) -> dict:
    """What ``contsup plan --json`` prints: per module its units, sources, parameters, shapes."""
    torch.manual_seed(recipe.run.seed)
    built = build_network(recipe)
    k = len(built.plans)
    method = training_method(recipe)
    spans = link_spans(method, [p.units for p in built.plans])
    detail_keys = getattr(recipe.objective.component, "plan_keys", ())
    modules = []
    has_parts = any(b.part is not None for b in built.network.blocks)  # a method's own parameters
    for plan, m in zip(built.plans, built.network.blocks):
        stage = recipe.module_range(plan.index)
        last = plan.index == k
        w_rec, w_local = m.weights
        details = []
        for s in plan.sources:
            adapter = m.adapters[str(s)]
            details.append(
                {
                    "name": str(s),
                    "adapter": getattr(adapter, "adapter_kind", None) or type(adapter).__name__,
                    "class": type(adapter).__name__,
                    "params": count_params(adapter),
                    "source_shape": list(built.info.input_shape if s.is_input else built.plans[s.index].input_shape),
                }
            )
        split = _params_split(m, has_parts)
        modules.append(
            {
                "index": plan.index,
                "units": plan.units,
                "unit_range": list(plan.unit_range),
                "sources": [str(s) for s in plan.sources],
                "source_details": details,
                "params": count_params(m),
                "params_split": split,
                "input_shape": list(plan.input_shape),
                "output_shape": list(plan.output_shape),
                "context": stage.context.use,
                "objective": "cross_entropy (backbone head)" if last else stage.objective.use,
                "head": "backbone" if last else getattr(stage.objective.options, "head", type(m.head).__name__),
                "decoder": None if last or stage.decoder is None else stage.decoder.use,
                "weights": {"reconstruction": w_rec, "local": w_local},
                **{key: head_detail(m.head, key, built.unit_shapes) for key in detail_keys},
            }
        )
        if getattr(method, "link", None) is not None:
            span = spans[plan.index - 1]
            modules[-1][method.name] = None if span is None else {
                "units": span[1] - span[0] + 1, "unit_range": list(span), "trained_by": plan.index + 1,
            }
    memory = plan_memory(recipe, built.network, built.plans, [p.units for p in built.plans])
    for entry, mem in zip(modules, memory.modules):
        entry["memory"] = {
            "bytes": mem.bytes, "adapter_bytes": mem.adapter_bytes, "body_bytes": mem.body_bytes,
            "body_flops": mem.body_flops, "adapter_flops": mem.adapter_flops, "link_bytes": mem.link_bytes,
            "head_bytes": mem.head_bytes,
        }
        if getattr(method, "link", None) is not None:
            entry["memory"][f"{method.name}_bytes"] = mem.link_bytes
    return {
        "backbone": recipe.backbone.use,
        "method": None if method is None else {"name": method.name, "links": getattr(method, "link", None) is not None,
                                              "note": getattr(method, "plan_note", None)},
        "head_details": list(detail_keys),
        "input_shape": list(built.info.input_shape),
        "num_units": len(built.unit_shapes),
        "modules": modules,
        "recompute": {"adapters": recipe.context_options.recompute, "head": recipe.context_options.recompute_head},
        "memory": {
            "batch_size": memory.batch, "measured_batch": memory.measured_batch,
            "units_bytes": memory.units_bytes, "largest_module_bytes": max(m.bytes for m in memory.modules),
            "notes": list(memory.notes),
        },
    }


def head_detail(head: Any, key: str, unit_shapes: Sequence[Any]) -> dict | None:
    """What a head says of itself under ``key`` (an objective's ``plan_keys``): the ``plan_detail``
    of the part of it whose ``plan_key`` is ``key``, with the head's parameters; None where the
    head has no such part."""
    inner = next((s for s in head.modules() if getattr(s, "plan_key", None) == key and hasattr(s, "plan_detail")), None)
    if inner is None:
        return None
    return {**inner.plan_detail(unit_shapes), "params": sum(p.numel() for p in head.parameters())}


def _print_head_details(modules: Sequence[dict], key: str) -> None:
    """A table of the ``key`` heads: per module, what each head says of itself, its parameters
    and memory (its ``plan_columns`` name the columns)."""
    found = [m for m in modules if m.get(key)]
    if not found:
        return
    columns = list(found[0][key]["columns"])
    rows = [("module", *columns, "head params", "head memory (MiB)")]
    for m in found:
        d = m[key]
        rows.append((str(m["index"]), *(str(d["columns"][c]) for c in columns), f"{d['params']:,}", _mib(m["memory"]["head_bytes"])))
    print(f"{key} heads: {found[0][key]['title']}:")
    print(format_table(rows))
    print()


def plan_main(recipe: Any, as_json: bool) -> int:
    """``contsup plan``: the plan as text, or as JSON with ``as_json``."""
    data = plan_data(recipe)
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    varied = bool(recipe.ranges) or recipe.decoder is not None
    header = ["module", "units", "unit range", "sources", "params", "output shape"]
    if varied:
        header += ["context", "objective", "head", "decoder (w_rec, w_local)"]
    method = data["method"]
    linked = bool(method and method["links"] and any(m[method["name"]] for m in data["modules"]))
    if linked:
        header.append(method["name"])
    rows = [tuple(header)]
    for m in data["modules"]:
        w = m["weights"]
        row = [
            str(m["index"]),
            str(m["units"]),
            f"{m['unit_range'][0]}-{m['unit_range'][1]}",
            ", ".join(m["sources"]) or "-",
            f"{m['params']:,}",
            "x".join(str(d) for d in m["output_shape"]),
        ]
        if varied:
            decoder = f"{m['decoder']} ({w['reconstruction']:g}, {w['local']:g})" if m["decoder"] else "-"
            row += [m["context"], m["objective"], m["head"], decoder]
        if linked:
            b = m[method["name"]]
            row.append(f"{b['unit_range'][0]}-{b['unit_range'][1]} (+ loss {b['trained_by']})" if b else "-")
        rows.append(tuple(row))
    context = "per [[modules]] range" if recipe.ranges else recipe.context.use
    print(
        f"{data['backbone']}: {data['num_units']} units, input "
        f"{'x'.join(str(d) for d in data['input_shape'])}, {len(data['modules'])} modules, context {context}"
    )
    print(format_table(rows))
    total = sum(m["params"] for m in data["modules"])
    print(f"total parameters: {total:,}")
    if linked:
        note = method["note"] or "the loss of module l+1 also trains these units of module l"
        print(f"{method['name']}: {note} (column \"{method['name']}\": those units); earlier units and all context stay isolated")
    if not varied and len(data["modules"]) > 1:
        first = data["modules"][0]
        print(f"local objective of modules 1..{len(data['modules']) - 1}: {first['objective']}, head {first['head']}")
    print()
    print("each module's input shape, the adapter serving each source, and params = body + head + adapters + decoder + method:")
    print(format_table(_detail_rows(data["modules"])))
    print()
    for key in data["head_details"]:
        _print_head_details(data["modules"], key)
    _print_memory(data, recipe)
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def _print_memory(data: dict, recipe: Any) -> None:
    """The plan's third part: what training each module keeps for backward, against end to end,
    and one warning line when context adapters cost more than the bodies they feed."""
    mem = data["memory"]
    print(f"activation memory kept for backward at batch {mem['batch_size']} (MiB):")
    linked = any(m["memory"]["link_bytes"] for m in data["modules"])
    recompute = data["recompute"]["adapters"]
    rows = [("module", "training", "its adapters", "its units", "MFLOPs per image: body / adapters")]
    if linked:
        rows[0] += (f"{data['method']['name']} (in training)",)
    for m in data["modules"]:
        x = m["memory"]
        flops = f"{x['body_flops'] / 1e6:,.1f} / {x['adapter_flops'] / 1e6:,.1f}"
        row = (str(m["index"]), _mib(x["bytes"]), _mib(x["adapter_bytes"]), _mib(x["body_bytes"]), flops)
        row += (_mib(x["link_bytes"]),) if linked else ()
        rows.append(row)
    print(format_table(rows))
    if recompute or data["recompute"]["head"]:
        pieces = " and ".join(p for p, on in (("context adapters", recompute), ("heads", data["recompute"]["head"])) if on)
        counted = "; ".join(c for c, on in (
            ("\"training\" counts the adapters' inputs, not their own activations (\"its adapters\")", recompute),
            ("\"training\" still counts the heads' activations", data["recompute"]["head"]),
        ) if on)
        print(f"context.recompute: the {pieces} keep only their inputs through the forward and run again in backward, "
              f"one at a time ({counted}; contsup bench --recompute measures the peak)")
    if linked:
        print(f"{data['method']['name']}: each module's training figure includes the linked units of the module before it, kept "
              "until its backward (estimated from their measurements)")
    units, largest = mem["units_bytes"], mem["largest_module_bytes"]
    ratio = f" ({largest / units:.2f}x)" if units else ""
    print(f"largest module: {_mib(largest)} MiB{ratio}; every unit at once, as end-to-end training keeps them: {_mib(units)} MiB")
    for note in mem["notes"]:
        print(f"note: {note}", file=sys.stderr)
    heavy = [m for m in data["modules"] if m["memory"]["adapter_bytes"] > m["memory"]["body_bytes"]
             or m["memory"]["adapter_flops"] > m["memory"]["body_flops"]]
    if heavy:
        worst = max(heavy, key=lambda m: m["memory"]["adapter_bytes"])["memory"]
        names = _span([m["index"] for m in heavy])
        options = getattr(recipe.context, "options", None)
        remedies = []
        if getattr(options, "encoder", "fast") != "fast":
            remedies.append('context.encoder = "fast" (pool x to the module\'s size first, then one conv)')
        if getattr(options, "shortcut", "paper") == "official":
            remedies.append('context.shortcut = "paper" (pool first, then the 1x1 conv)')
        cheaper = "set " + " and ".join(remedies) if remedies else "choose a cheaper adapter for these modules"
        if not recipe.context_options.recompute:
            cheaper += "; or, for memory alone and the same training, context.recompute = true (the adapters run again in backward)"
        print(
            f"warning: the context adapters of module{'s' if len(heavy) > 1 else ''} {names} cost more memory or "
            f"arithmetic than the module's body (the largest: {_mib(worst['adapter_bytes'])} MiB against "
            f"{_mib(worst['body_bytes'])} MiB); {cheaper}",
            file=sys.stderr,
        )


def _span(indices: Sequence[int]) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"."""
    parts, start = [], None
    for i, k in enumerate(indices):
        if start is None:
            start = k
        if i + 1 == len(indices) or indices[i + 1] != k + 1:
            parts.append(str(start) if start == k else f"{start}-{k}")
            start = None
    return ", ".join(parts)


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def _detail_rows(modules: Sequence[dict]) -> list[tuple[str, ...]]:
    """The second table of ``contsup plan``: each module's input shape, the adapter serving each
    source with its parameter count, and the module's parameters split into its parts."""
    optional = [key for key in ("decoder", "method") if any(m["params_split"].get(key) for m in modules)]
    header = ["module", "input shape", "sources (adapter, params)", "body", "head", "adapters", *optional]
    rows = [tuple(header)]
    for m in modules:
        split = m["params_split"]
        context = ", ".join(f"{d['name']} ({d['adapter']}, {d['params']:,})" for d in m["source_details"])
        row = [str(m["index"]), _shape(m["input_shape"]), context or "-", f"{split['body']:,}", f"{split['head']:,}", f"{split['adapters']:,}"]
        row += [f"{split[key]:,}" for key in optional]
        rows.append(tuple(row))
    return rows


__all__ = ["plan_data", "plan_main", "plan_memory", "PlanMemory", "ModuleMemory", "link_spans", "forward_flops", "head_detail"]
